"""SCE, Multi-SLERP and Karcher in passes over chunks of the raw inputs (chunks.py): the bits of the whole-tensor
path and of mergekit 0.1.5's functions (float32, one torch thread) on tensors of many blocks, on 1 and 2 merging
threads; and memory that holds one to three float32 vectors of the tensor's size, whatever the number of models.

Their whole-tensor reductions (norms, sums, dot products) are torch's calls on one whole float32 vector each
(``chunks.collect``), so nothing is rounded differently from mergekit; the rest is element-wise in chunks. SCE's
top-k is a radix select in chunks over its variance vector, which ranks equal variances by position, as TIES does:
the bits of mergekit's with its top-k made stable (``stable_mergekit_topk``); unpatched, the same bits on float32
inputs (no equal variances at the cut), and on bf16 ones differences only at entries tied at the cut."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_chunked import run_chunks

from mergekit_lite.strategies.registry import get_strategy
from mergekit_lite.strategy import TensorContext

CASES = [
    ("sce", True, {"select_topk": 0.5}, {"select_topk": 0.5, "int8_mask": False}),
    ("sce", True, {"select_topk": 1.0}, {"select_topk": 1.0, "int8_mask": False}),
    ("multislerp", True, {"weight": [0.5, 0.3, 0.4]}, {"weight": (0.5, 0.3, 0.4), "normalize_weights": True,
                                                        "eps": 1e-8}),
    ("multislerp", False, {"weight": [0.5, -0.2, 0.4], "normalize_weights": False},
     {"weight": (0.5, -0.2, 0.4), "normalize_weights": False, "eps": 1e-8}),
    ("karcher", False, {}, {"max_iter": 10, "tol": 1e-5}),
]


@pytest.fixture
def stable_mergekit_topk(monkeypatch):
    """mergekit's sce with its top-k ranking equal variances by position (a stable sort), as ours and TIES' do."""
    import mergekit.merge_methods.sce as theirs

    class StableTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def topk(x, k, largest=True, **_):
            values, indices = torch.sort(x, descending=largest, stable=True)
            return values[:k], indices[:k]

    monkeypatch.setattr(theirs, "torch", StableTorch())


def inputs(shape, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three bf16 models near a bf16 base: many equal float32 variances, so SCE's top-k cut meets ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    return [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(3)], base


@pytest.mark.parametrize("name,with_base,theirs,ours", CASES)
@pytest.mark.parametrize("shape", [(600, 701), (300, 7), (1,)])
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_chunks_give_the_whole_paths_and_mergekits_bits(name, with_base, theirs, ours, shape, torch_threads,
                                                        monkeypatch, stable_mergekit_topk):
    """Blocks of 4096 entries: (600, 701) is 103 of them, the last partial. mergekit and we on the same number
    of torch threads (its norms of whole 1-D tensors, and karcher's BLAS dot, round differently on more; its
    reductions of each model's row of a stack do not, and neither do ours: ``chunks.as_rows``)."""
    from mergekit.merge_methods.api import merge_tensors

    monkeypatch.setattr(f"mergekit_lite.strategies.{name}.BLOCK", 1 << 12)
    models, base = inputs(shape)
    strategy = get_strategy(name)
    assert strategy.chunks(ours) is not None
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        floats = [m.float() for m in models]
        expected = merge_tensors(floats + [base.float()] if with_base else floats, name, parameters=theirs,
                                 base_index=3 if with_base else None)
        whole = strategy(floats, base.float() if with_base else None, ctx, **ours)
        assert torch.equal(whole, expected)
        for workers in (1, 2):
            got = run_chunks(strategy.chunked, models, base if with_base else models[0], ctx, workers, **ours) \
                if with_base else _without_base(strategy.chunked, models, ctx, workers, **ours)
            assert torch.equal(got, expected), (name, shape, workers)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_against_mergekits_own_topk(dtype, monkeypatch):
    """mergekit's top-k unpatched. float32 inputs have no equal variances at the cut: its bits, output and mask.
    bf16 inputs have groups of equal variances straddling the cut, which torch's top-k orders its own way: the
    same number of entries is kept, and every entry where the masks differ has the cut's variance."""
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.sce import sce_mask

    from mergekit_lite.strategies.chunks import Chunks
    from mergekit_lite.strategies.sce import _select

    monkeypatch.setattr("mergekit_lite.strategies.sce.SELECT_CHUNK", 1 << 12)   # 103 chunks
    g = torch.Generator().manual_seed(3)
    base = torch.randn(600, 701, generator=g).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(600, 701, generator=g)).to(dtype).float() for _ in range(3)]
    base = base.float()
    ctx = TensorContext("w", 0, 0.0)
    for fraction in (0.1, 0.5, 0.9):
        theirs = sce_mask(torch.stack(models) - base, fraction, torch.bool).view(-1)
        ours = _select(Chunks(models, base, lambda *_: None), fraction)
        differ = int((ours != theirs).sum())
        if dtype == torch.float32:
            assert differ == 0
            expected = merge_tensors(models + [base], "sce", parameters={"select_topk": fraction}, base_index=3)
            got = run_chunks(get_strategy("sce").chunked, models, base, ctx, 2, select_topk=fraction,
                             int8_mask=False)
            assert torch.equal(got, expected)
            continue
        variance = torch.var(torch.stack(models) - base, dim=0, unbiased=False).view(-1)
        cut = variance[ours].min()
        tied = int((variance == cut).sum())
        assert int(ours.sum()) == int(theirs.sum()) and bool((variance[ours != theirs] == cut).all())
        assert tied > 1 and differ <= tied, (fraction, differ, tied)   # measured: 1862 of 7677, 714 of 1743, 304 of 10499


def _without_base(body, models, ctx, workers, **params) -> torch.Tensor:
    from concurrent.futures import ThreadPoolExecutor

    from mergekit_lite.strategies.chunks import Chunks

    out = torch.full((models[0].numel(),), float("nan"))

    def emit(start: int, values: torch.Tensor) -> None:
        out[start:start + values.numel()] = values

    with ThreadPoolExecutor(workers) as pool:
        spread = lambda fn, items: list(pool.map(fn, items))   # noqa: E731
        body(Chunks(models, None, emit, lambda chunk: chunk.to(torch.float32), spread), ctx, **params)
    return out.view(models[0].shape)


# A child process: raw bf16 inputs, then each method's chunked merge on 2 threads; by how much each one's peak
# RSS exceeds the RSS before it, in MB.
PEAK = textwrap.dedent("""
    import ctypes, json, sys, torch
    from concurrent.futures import ThreadPoolExecutor
    from mergekit_lite.strategies.chunks import Chunks
    from mergekit_lite.strategies.registry import get_strategy
    from mergekit_lite.strategy import TensorContext
    def status(key):   # kB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
    cases, n, numel = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(numel, generator=g)).to(torch.bfloat16) for _ in range(n)]
    out = torch.zeros(numel, dtype=torch.bfloat16)
    def emit(start, values):
        out[start:start + values.numel()] = values
    with ThreadPoolExecutor(2) as pool:
        spread = lambda fn, items: list(pool.map(fn, items))
        for name, params in cases[:1] + cases:   # the first run once more: threads' arenas, first-use costs
            ctypes.CDLL("libc.so.6").malloc_trim(0)      # freed memory back to the system: not counted as ours
            open("/proc/self/clear_refs", "w").write("5")   # the peak RSS starts again from here
            before = status("VmRSS")
            get_strategy(name).chunked(Chunks(models, base, emit, lambda c: c.to(torch.float32), spread),
                                       TensorContext("w", 0, 0.0), **params)
            print((status("VmHWM") - before) / 1024)
""")


def test_memory_holds_a_few_vectors_not_a_copy_per_model():
    """Six bf16 models of 4M entries: a float32 copy of each would be 6 x 16 MB more. We allow the float32
    vectors each method needs (16 MB each: SCE 1, the variances and then the squares, plus with select_topk a
    byte an entry, its mask: no top-k workspace, which in torch takes 16 bytes an entry, 64 MB here;
    Multi-SLERP 2; Karcher 3) and 60 MB for the two merging threads' blocks and allocator slack (measured: 16-45)."""
    numel, n = 4 << 20, 6
    cases = [("sce", {"select_topk": 1.0, "int8_mask": False}),
             ("sce", {"select_topk": 0.5, "int8_mask": False}),
             ("multislerp", {"weight": [0.3, 0.2, 0.3, 0.2, 0.4, 0.1], "normalize_weights": True, "eps": 1e-8}),
             ("karcher", {"max_iter": 2, "tol": 1e-5})]
    found = subprocess.run([sys.executable, "-c", PEAK, json.dumps(cases), str(n), str(numel)],
                           capture_output=True, text=True, check=True)
    vector = numel * 4 / 2**20
    peaks = list(map(float, found.stdout.split()))[1:]
    for (name, _), vectors, grown in zip(cases, (1, 1.25, 2, 3), peaks):
        assert grown < vectors * vector + 60, f"{name}: peak RSS grew {grown:.0f} MB"   # sce 0.5: 47-63 MB; topk: 122
    assert grown < n * vector   # even Karcher's bound is below one float32 copy of every model


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    from test_chunked import BIG

    from mergekit_lite.testing.synthetic import write_model

    root = tmp_path_factory.mktemp("big_sphere")
    for name, delta_seed in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), BIG, dtype=torch.bfloat16, seed=0, delta_seed=delta_seed, delta_scale=0.02,
                    max_shard_size=3_000_000)
    return root


@pytest.mark.parametrize("method,parameters", [("sce", "parameters: {select_topk: 0.6}\n"),
                                               ("multislerp", "parameters: {normalize_weights: true}\n")])
def test_end_to_end_gives_mergekits_tensors(method, parameters, big_models, tmp_path, monkeypatch,
                                            stable_mergekit_topk):
    """Through the engine (raw bf16 inputs, both merging threads, several shards): 1.3M-entry embeddings are
    several blocks; every tensor equals mergekit's with dtype: float32."""
    from test_mergekit_parity import assert_same, both

    import mergekit_lite.engine.loop as engine

    chunked = []
    merge_chunks = engine.merge_chunks
    monkeypatch.setattr(engine, "merge_chunks", lambda plan, job, *a, **k: chunked.append(job.name) or
                        merge_chunks(plan, job, *a, **k))

    root = big_models
    weight = "\n    parameters: {weight: 0.6}" if method == "multislerp" else ""
    spec = (f"merge_method: {method}\nbase_model: {root}/base\nmodels:\n  - model: {root}/ft-a{weight}\n"
            f"  - model: {root}/ft-b{weight.replace('0.6', '0.3')}\n{parameters}dtype: float32\n")
    ours, theirs = both(spec, tmp_path, max_shard_size=3_000_000)
    assert len(list(ours.glob("*.safetensors"))) >= 2 and "model.embed_tokens.weight" in chunked
    assert_same(ours, theirs)
