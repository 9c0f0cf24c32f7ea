"""recompute merges again as the merge did: the same torch thread setting, the same pieces, compared piece by piece.

Compared against the bytes `merge run` wrote (bit-exact), and against a flipped value whose position the
report must name exactly (the offsets of the row blocks)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch

from mergekit_lite import run_merge, validate
from mergekit_lite.engine import loop
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
