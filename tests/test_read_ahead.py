"""Asking the kernel for input bytes ahead of the reader: exactly the bytes each piece reads, in pieces the kernel
takes whole, never more than the window ahead, and the merge's bytes the same with the hints as without."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import mergekit_lite.engine.loop as engine
import mergekit_lite.engine.pipeline as pipeline
from mergekit_lite import make_plan
from mergekit_lite.plan.shards import output_layout
from mergekit_lite.sources.checkpoint import ADVICE, Checkpoint
from mergekit_lite.sources.opener import open_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")


def _advised(monkeypatch) -> list[tuple[int, int, int]]:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    return calls


def test_a_tensor_is_advised_whole_in_pieces_the_kernel_reads_whole(models_bf16, monkeypatch):
    checkpoint = open_checkpoint(str(models_bf16 / "ft-a"))
    try:
        info = max(checkpoint.tensors.values(), key=lambda i: i.nbytes)
        for rows in (None, (1, info.shape[0] - 1), (info.shape[0] - 1, info.shape[0])):
            calls = _advised(monkeypatch)
            checkpoint.will_read(info.name, rows)
            row_bytes = info.nbytes // info.shape[0]
            start = info.start + (rows[0] * row_bytes if rows else 0)
            end = info.start + (rows[1] * row_bytes if rows else info.nbytes)
            assert calls and all(advice == os.POSIX_FADV_WILLNEED for _, _, advice in calls)
            assert calls[0][0] == start and calls[-1][0] + calls[-1][1] == end
            assert all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:]))        # contiguous, in order
            assert all(0 < length <= ADVICE for _, length, _ in calls)
    finally:
        checkpoint.close()


def test_large_ranges_are_split_into_advice_sized_calls(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(ADVICE // 2 + 5, 4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    checkpoint = Checkpoint("t", str(tmp_path), open_checkpoint(str(tmp_path)).tensors, {})
    calls = _advised(monkeypatch)
    checkpoint.will_read("w")
    info = checkpoint.tensors["w"]
    assert info.nbytes == 4 * ADVICE + 40
    assert [length for _, length, _ in calls] == [ADVICE] * 4 + [40]
    assert [offset for offset, _, _ in calls] == [info.start + i * ADVICE for i in range(5)]
    checkpoint.will_read("missing")     # an unknown name, and a failing call, change nothing
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: (_ for _ in ()).throw(OSError(22, "refused")))
    checkpoint.will_read("w")
    checkpoint.close()


def _settle(asked: list, expected: list, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while asked != expected and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)   # and nothing more comes
    assert asked == expected


def test_read_ahead_stays_within_its_window_and_skips_what_the_reader_has_started():
    asked: list[int] = []
    ahead = pipeline.ReadAhead(list(range(10)), [100] * 10, asked.append, window=250)
    try:
        _settle(asked, [0, 1, 2])            # 300 bytes asked: at least the window ahead of a reader at 0
        ahead.reading(100)
        _settle(asked, [0, 1, 2, 3])
        ahead.reading(500)                   # the reader jumped to 600 bytes: pieces 4 and 5 are not asked
        _settle(asked, [0, 1, 2, 3, 6, 7, 8])
        ahead.reading(300)                   # at 900: piece 9 is not started yet
        _settle(asked, [0, 1, 2, 3, 6, 7, 8, 9])
    finally:
        ahead.stop()


def test_a_failing_hint_stops_the_hints_not_the_reader():
    def fail(piece):
        raise OSError(5, "input/output error")

    reader = pipeline.Reader(list(range(4)), lambda p: [torch.full((2,), float(p))], lambda p: 8, fail)
    try:
        assert [float(loaded[0][0]) for _, loaded in reader] == [0.0, 1.0, 2.0, 3.0]
    finally:
        reader.stop()


def _spy(monkeypatch) -> tuple[list, list]:
    """(hinted, read): every Checkpoint.will_read and Checkpoint.read as (folder, name, rows), from any thread."""
    hinted, read = [], []
    lock = threading.Lock()
    will_read, original_read = Checkpoint.will_read, Checkpoint.read

    def spy_hint(self, name, rows=None):
        with lock:
            hinted.append((self.folder, name, rows))
        return will_read(self, name, rows)

    def spy_read(self, name, rows=None, out=None):
        with lock:
            read.append((self.folder, name, rows))
        return original_read(self, name, rows, out)

    monkeypatch.setattr(pipeline, "READ_AHEAD", 1 << 30)
    monkeypatch.setattr(Checkpoint, "will_read", spy_hint)
    monkeypatch.setattr(Checkpoint, "read", spy_read)
    return hinted, read


def test_a_merge_asks_for_every_piece_it_reads_and_writes_the_same_bytes(models_bf16, tmp_path, monkeypatch):
    spec = {"merge_method": "task_arithmetic", "base_model": str(models_bf16 / "base"), "dtype": "float32",
            "models": [{"model": str(models_bf16 / n), "parameters": {"weight": 0.5}} for n in ("ft-a", "ft-b")]}
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 64)      # many row blocks per tensor

    def run(folder):
        plan = make_plan(spec)
        try:
            layout = output_layout(plan, 60_000)
            os.makedirs(folder)
            engine.write_shards(plan, layout, str(folder), torch.device("cpu"))
            return {s.file: (folder / s.file).read_bytes() for s in layout}
        finally:
            plan.close()

    hinted, read = _spy(monkeypatch)
    with_hints = run(tmp_path / "hinted")
    assert len(read) > 3 * 50 and len(set(read)) == len(read)
    missed = [r for r in read if r not in set(hinted)]
    assert len(missed) <= 3, missed[:5]                   # at most the first piece's inputs: the reader got there first
    assert len(set(hinted)) == len(hinted) and set(hinted) <= set(read)
    monkeypatch.setattr(Checkpoint, "will_read", lambda self, name, rows=None: None)
    assert run(tmp_path / "plain") == with_hints


def test_a_fold_asks_for_the_base_rows_it_folds(tmp_path, monkeypatch):
    from mergekit_lite.api.fold import fold_spec
    from mergekit_lite.testing.adapters import AdapterShape, write_adapter
    from mergekit_lite.testing.synthetic import LlamaShape, write_model

    shape = LlamaShape(hidden=96, intermediate=200, layers=2, heads=4, kv_heads=2, vocab=300)
    write_model(str(tmp_path / "base"), shape, dtype=torch.bfloat16, max_shard_size=60_000)
    write_adapter(str(tmp_path / "a"), shape, AdapterShape(("q_proj", "down_proj"), r=4, scale=0.05), seed=1)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 64 * 96)   # folded in blocks of rows
    hinted, read = _spy(monkeypatch)
    plan = make_plan(fold_spec(tmp_path / "base", [tmp_path / "a"], [1.0], check_base=False))
    try:
        os.makedirs(tmp_path / "out")
        engine.write_shards(plan, output_layout(plan, 60_000), str(tmp_path / "out"), torch.device("cpu"))
    finally:
        plan.close()
    base = os.path.realpath(tmp_path / "base")
    from_base = [r for r in read if os.path.realpath(r[0]) == base]
    folded = [r for r in from_base if "q_proj" in r[1] or "down_proj" in r[1]]
    assert len(folded) >= 8 and any(r[2] is not None for r in folded)    # folded tensors' rows, read in blocks
    missed = [r for r in from_base if r not in set(hinted)]
    assert len(missed) <= 1, missed[:5]
