"""recompute merges again as the merge did: the same torch thread setting, the same pieces, compared piece by piece.

Compared against the bytes `merge run` wrote (bit-exact), and against a flipped value whose position the
report must name exactly (the offsets of the row blocks)."""

from __future__ import annotations

import math
import struct
import threading
from pathlib import Path

import pytest
import torch

from mergekit_lite import run_merge, validate
from mergekit_lite.engine import loop
from mergekit_lite.strategies.chunks import Chunks
from mergekit_lite.testing.synthetic import LlamaShape, write_model
from mergekit_lite.validation.folder import read_output

# the embedding, 2048 x 64 = 131072 values, is larger than torch's grain (32768): a norm over it is split over
# two threads when torch has two
SHAPE = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=2048)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_model(str(root / "base"), SHAPE, dtype=torch.bfloat16, seed=1, tokenizer=False)
    write_model(str(root / "a"), SHAPE, dtype=torch.bfloat16, seed=1, delta_seed=2, delta_scale=0.05,
                tokenizer=False)
    write_model(str(root / "b"), SHAPE, dtype=torch.bfloat16, seed=1, delta_seed=3, delta_scale=0.05,
                tokenizer=False)
    return root


def spec(root: Path, method: str) -> str:
    weights = "" if method == "karcher" else "\n    parameters: {weight: 0.4}"
    return (f"merge_method: {method}\ndtype: bfloat16\nmodels:\n" +
            "".join(f"  - model: {root / name}{weights}\n" for name in ("base", "a", "b")))


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_karcher_recomputed_under_the_merges_thread_setting(models, tmp_path, two_threads):
    """The merge runs one torch thread on the CPU; a recomputation with two splits karcher's norms over two
    threads, adds in another order, and used to differ by a last bit (a correct merge FAILED)."""
    out = tmp_path / "out"
    run_merge(spec(models, "karcher"), out, progress=False, validate=False)
    assert torch.get_num_threads() == 2
    report = validate(out, device="cpu", full=True, forward=False)
    numbers = report.check("recompute").numbers
    assert report.check("recompute").status == "passed", str(report)
    assert numbers["bit_exact"] == numbers["tensors"] == numbers["planned"]
    assert numbers["max_ulp"] == 0.0
    assert torch.get_num_threads() == 2   # restored


def test_pieces_hold_what_the_merge_holds(models, tmp_path, monkeypatch):
    """Row blocks much smaller than the tensors: each piece compared with its rows of the written bytes; the live
    float32 bytes of a piece (its inputs and result) stay within (inputs + 2) x the piece; the numbers are those
    of whole-piece recomputation."""
    out = tmp_path / "out"
    run_merge(spec(models, "linear"), out, progress=False, validate=False)
    whole = validate(out, device="cpu", full=True, forward=False).check("recompute").numbers

    piece_values = 4096
    monkeypatch.setattr(loop, "PIECE_ELEMENTS", piece_values)
    pieces = loop.computed_pieces
    seen: list[tuple[int, int]] = []    # (values in the piece, live bytes of its inputs and result)

    def counted(plan, job, device, threads=1):
        for rows, result, inputs in pieces(plan, job, device, threads):
            live = sum(t.numel() * t.element_size() for t in inputs) + result.numel() * result.element_size()
            seen.append((result.numel(), live))
            yield rows, result, inputs

    monkeypatch.setattr(loop, "computed_pieces", counted)
    report = validate(out, device="cpu", full=True, forward=False)
    numbers = report.check("recompute").numbers
    assert report.check("recompute").status == "passed", str(report)
    assert {k: numbers[k] for k in ("bit_exact", "max_ulp", "tensors")} == \
           {k: whole[k] for k in ("bit_exact", "max_ulp", "tensors")}
    assert numbers["bit_exact"] == numbers["tensors"]
    embedding = SHAPE.vocab * SHAPE.hidden
    assert embedding >= 30 * piece_values
    assert len(seen) > 30 + numbers["tensors"]                 # the large tensors came in many pieces
    assert max(values for values, _ in seen) <= piece_values
    assert max(live for _, live in seen) <= (3 + 2) * 4 * piece_values

    # a value flipped in a late row block: found, at its own position
    info = read_output(str(out)).tensors["model.embed_tokens.weight"]
    element = embedding - 3 * SHAPE.hidden + 5     # row vocab - 3, column 5
    with open(info.path, "r+b") as f:
        f.seek(info.start + 2 * element)
        f.write(struct.pack("<H", 0x7F00))          # bfloat16 1.7e38
    failed = validate(out, device="cpu", full=True, forward=False).check("recompute")
    assert failed.status == "failed"
    assert failed.failures[0].tensor == "model.embed_tokens.weight"
    assert f"at [{SHAPE.vocab - 3}, 5]" in failed.failures[0].message
    assert "1 of " + str(math.prod((SHAPE.vocab, SHAPE.hidden))) + " values" in failed.failures[0].message


PRUNED = {
    "breadcrumbs": "{weight: 0.6, density: 0.8, gamma: 0.05}",
    "della": "{weight: 0.6, density: 0.5, epsilon: 0.15}",
}



def pruned_spec(root: Path, method: str) -> str:
    return (f"merge_method: {method}\ndtype: bfloat16\nbase_model: {root / 'base'}\nmodels:\n" +
            "".join(f"  - model: {root / name}\n    parameters: {PRUNED[method]}\n" for name in ("a", "b")))


@pytest.mark.parametrize("method", sorted(PRUNED))
def test_whole_tensor_passes_are_recomputed_on_the_recompute_threads(models, tmp_path, monkeypatch, method):
    """A whole-tensor merge's passes (ranks, masks, sums over chunks) run on the recompute threads, as the merge
    spreads them over its merging threads, and the recomputation still gives the written bytes: bit-exact for
    every tensor, and a flipped value found."""
    out = tmp_path / "out"
    run_merge(pruned_spec(models, method), out, progress=False, validate=False)
    monkeypatch.setattr(loop, "merge_threads", lambda: 2)
    names: set[str] = set()
    mapped = Chunks.map

    def noted(self, fn, step):
        def run(start, end):
            names.add(threading.current_thread().name.rsplit("_", 1)[0])
            return fn(start, end)
        return mapped(self, run, step)

    monkeypatch.setattr(Chunks, "map", noted)
    report = validate(out, device="cpu", full=True, forward=False)
    recomputed = report.check("recompute")
    assert recomputed.status == "passed", str(report)
    assert recomputed.numbers["bit_exact"] == recomputed.numbers["tensors"] == 2 * 9 + 3
    assert "mergekit-lite-recompute" in names and "MainThread" not in names

    info = read_output(str(out)).tensors["model.layers.1.mlp.down_proj.weight"]
    with open(info.path, "r+b") as f:
        f.seek(info.start + 2 * 7)
        value = struct.unpack("<H", f.read(2))[0]
        f.seek(info.start + 2 * 7)
        f.write(struct.pack("<H", value ^ 0x0010))   # one mantissa bit of one value
    failed = validate(out, device="cpu", full=True, forward=False).check("recompute")
    assert failed.status == "failed"
    assert [f.tensor for f in failed.failures] == ["model.layers.1.mlp.down_proj.weight"]
    assert "1 of " in failed.failures[0].message and "at [0, 7]" in failed.failures[0].message


def test_the_free_heap_is_released_before_the_largest_whole_tensor_merges(models, tmp_path, monkeypatch):
    """The peak of a whole-tensor merge is at its largest tensors, after every earlier tensor left freed blocks in
    the heap: their pages go back to the kernel right before each merge of a tensor at least half the largest
    (here the embedding and lm_head), and before no other, where faulting them in again would only cost time."""
    events: list[str] = []
    merge_chunks = loop.merge_chunks

    def noted(plan, job, inputs, spread=loop.in_order):
        events.append(job.name)
        return merge_chunks(plan, job, inputs, spread)

    monkeypatch.setattr(loop, "merge_chunks", noted)
    monkeypatch.setattr(loop, "release_free_heap", lambda: events.append("release"))
    run_merge(pruned_spec(models, "breadcrumbs"), tmp_path / "out", progress=False, validate=False)
    released = [events[i + 1] for i, event in enumerate(events) if event == "release"]
    assert sorted(released) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len([e for e in events if e != "release"]) == 2 * 9 + 3       # every tensor merged whole, once
