"""Folding by blocks of rows (a LoRA fold on the merging threads) gives the bytes of folding whole tensors; the
resume journal's input checksums of a fold are the same from the merge loop and from reading again."""

from __future__ import annotations

import pytest
import torch

import mergekit_lite.engine.loop as engine
import mergekit_lite.lora.fold as fold_module
from mergekit_lite import make_plan
from mergekit_lite.api.fold import fold_spec
from mergekit_lite.lora.source import DeferredFold, LoraSource
from mergekit_lite.output.journal import combine, read_checksums
from mergekit_lite.plan.shards import file_order, output_layout
from mergekit_lite.testing.adapters import AdapterShape, write_adapter
from mergekit_lite.testing.synthetic import LlamaShape, write_model

# Output rows that are not multiples of fold.ROW_ALIGN (64): 200 (MLP), 96 (attention), 300 (vocabulary)
ODD = LlamaShape(hidden=96, intermediate=200, layers=2, heads=4, kv_heads=2, vocab=300)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A bf16 base and two adapters folded one after the other (rsLoRA on everything, then a weighted one)."""
    root = tmp_path_factory.mktemp("rows")
    write_model(str(root / "base"), ODD, dtype=torch.bfloat16, max_shard_size=60_000)
    write_adapter(str(root / "a"), ODD, AdapterShape(ALL, r=16, lora_alpha=32, use_rslora=True, scale=0.05), seed=1)
    write_adapter(str(root / "b"), ODD, AdapterShape(("q_proj", "down_proj"), r=4, scale=0.05), seed=2)
    plan = make_plan(fold_spec(root / "base", [root / "a", root / "b"], [1.0, 0.7], check_base=False))
    yield plan
    plan.close()


def lora_source(plan) -> LoraSource:
    (source,) = {id(s.checkpoint): s.checkpoint for job in plan.jobs for s in job.sources}.values()
    assert isinstance(source, LoraSource)
    return source


@pytest.mark.parametrize("block", [64 * 96, 1 << 18])   # blocks of 64 rows; one block per tensor
def test_row_blocks_equal_the_whole_fold(folded, monkeypatch, block):
    monkeypatch.setattr(fold_module, "BLOCK_ELEMENTS", block)
    source = lora_source(folded)
    assert len(source.recipes) == 2 * 7
    for name, recipe in source.recipes.items():
        whole = source._fold(name, recipe)       # delta_weight + fold on the whole tensor: peft's arithmetic
        assert torch.equal(source.read(name).view(torch.int16), whole.view(torch.int16)), name
        rows = whole.shape[0]
        for step in (37, 64, 100):               # pieces that start and end off the 64-row grid
            deferred = [source.fetch(name, (start, min(start + step, rows))) for start in range(0, rows, step)]
            assert all(isinstance(d, DeferredFold) for d in deferred)
            pieces = torch.cat([d.resolve() for d in reversed(deferred)][::-1])   # resolved in any order
            assert torch.equal(pieces.view(torch.int16), whole.view(torch.int16)), (name, step)


def test_loop_in_row_pieces_writes_the_whole_fold(folded, monkeypatch, tmp_path):
    """The merge loop folds row pieces on two merging threads: the same bytes as whole tensors, and each
    shard's input checksums are what resume computes by reading the inputs again."""
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 37 * 96)   # several pieces per tensor, off the 64-row grid
    layout = output_layout(folded, 60_000)
    records = []
    engine.write_shards(folded, layout, str(tmp_path), torch.device("cpu"), on_shard=records.append, threads=2)
    from safetensors.torch import load_file

    written = {}
    for shard in layout:
        written.update(load_file(str(tmp_path / shard.file)))
    source = lora_source(folded)
    for name, recipe in source.recipes.items():
        assert torch.equal(written[name].view(torch.int16), source._fold(name, recipe).view(torch.int16)), name
    jobs = {job.name: job for job in folded.jobs}
    by_file = {r.file: r for r in records}
    for shard in layout:
        shard_jobs = [jobs[e.name] for e in file_order(shard.entries)]
        assert by_file[shard.file].inputs == combine(map(read_checksums, shard_jobs)), shard.file
