"""Whole-tensor methods run in passes over chunks of the raw inputs (chunks.py): SLERP and the pruning family.

The chunked path must give the bits of the whole-tensor path (and, for SLERP, mergekit's) on tensors of
several 1M-element chunks, whatever the number of threads, and still name a bad input."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers.models import read_folder
from safetensors.torch import load_file, save_file

from mergekit_lite import run_merge
from mergekit_lite.errors import ModelError
from mergekit_lite.strategies import sparsifiers
from mergekit_lite.strategies.chunks import Chunks, in_order
from mergekit_lite.strategies.registry import get_strategy
from mergekit_lite.strategy import TensorContext
from mergekit_lite.testing.synthetic import LlamaShape, write_model

# Embeddings and lm_head of 8192 x 160 = 1.3M entries: two chunks of 1M (a full one and a partial one).
BIG = LlamaShape(hidden=160, intermediate=256, layers=1, heads=4, kv_heads=2, vocab=8192)
EMBED = "model.embed_tokens.weight"


def run_chunks(body, inputs: list[torch.Tensor], base: torch.Tensor, ctx: TensorContext, threads: int,
               **params) -> torch.Tensor:
    """``body`` as the engine runs it: raw (stored dtype) inputs converted a chunk at a time, passes spread
    over ``threads`` threads; the float32 result."""
    out = torch.full((base.numel(),), float("nan"))

    def emit(start: int, values: torch.Tensor) -> None:
        out[start:start + values.numel()] = values

    with ThreadPoolExecutor(threads) as pool:
        spread = lambda fn, items: list(pool.map(fn, items))   # noqa: E731
        body(Chunks(inputs, base, emit, lambda chunk: chunk.to(torch.float32), spread), ctx, **params)
    return out.view(base.shape)


def pair(n: int, colinear: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    other = base.float() * 1.5 + (0.001 if colinear else 1.0) * torch.randn(n, generator=g)
    return base, other.to(torch.bfloat16)


@pytest.mark.parametrize("n", [1, 1000, 1 << 20, (1 << 20) * 2 + 12345])
@pytest.mark.parametrize("colinear", [False, True], ids=["arc", "colinear"])
def test_slerp_chunks_give_mergekits_bits(n, colinear):
    """mergekit's own slerp function on the same float32 values, 1M-element chunks and all."""
    merge_methods = pytest.importorskip("mergekit.merge_methods.slerp")
    base, other = pair(n, colinear)
    body = get_strategy("slerp").chunked
    for t in (0.3, 0.0, 1.2):
        ours = run_chunks(body, [other], base, TensorContext("w", None, 0.0), threads=2, t=t)
        theirs = merge_methods.slerp(torch.tensor(t), base.float().view(1, -1), other.float().view(1, -1))
        assert torch.equal(ours.view(1, -1), theirs), (n, colinear, t)
        whole = get_strategy("slerp")([other.float()], base.float(), TensorContext("w", None, 0.0), t=t)
        assert torch.equal(ours, whole)


@pytest.mark.parametrize("method,rescale", [("dare_linear", True), ("dare_linear", False), ("dare_ties", True),
                                            ("dare_ties", False), ("ties", False), ("breadcrumbs", False),
                                            ("breadcrumbs_ties", True), ("della", True), ("della_linear", False)])
@pytest.mark.parametrize("shape", [(2100, 1300), (300, 7), (1,)])
def test_pruning_chunks_equal_the_whole_tensor_function(method, rescale, shape):
    """Three bf16 inputs (over three chunks for the largest shape): the chunked body on 1 and 2 threads gives
    the bytes of the whole-tensor function on float32 copies. Densities 1 and 0 included (nothing pruned,
    everything pruned); bf16 deltas have many equal magnitudes, so TIES' cut splits groups of equals."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    inputs = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(4)]
    strategy = get_strategy(method)
    params = dict(weight=(0.6, -0.3, 0.5, 0.4), density=(0.35, 1.0, 0.0, 0.8), normalize=method != "dare_linear",
                  rescale=rescale, **{"lambda": 0.9})
    if method == "ties":
        params["int8_mask"] = False
    if method.startswith("breadcrumbs"):
        params["gamma"] = (0.05, 0.0, 0.3, 0.01)
    if method.startswith("della"):
        params["epsilon"] = (0.2, 0.1, 0.0, 0.15)
    assert strategy.chunks(params) is not None
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0, seed=3)
    whole = strategy([x.float() for x in inputs], base.float(), ctx, **params)
    for threads in (1, 2):
        assert torch.equal(run_chunks(strategy.chunked, inputs, base, ctx, threads, **params), whole)
    if method == "ties" and len(shape) == 2:
        magnitude = (inputs[0].float() - base.float()).abs().flatten()
        k = int(0.35 * magnitude.numel())
        cut = magnitude.sort(descending=True).values[k - 1]
        assert int((magnitude > cut).sum()) < k < int((magnitude >= cut).sum())   # a group straddles the cut
    if method.startswith(("breadcrumbs", "della")):      # something was pruned, and not everything
        kept = int(torch.count_nonzero(whole.float() - base.float()))
        assert 0 < kept < whole.numel() or whole.numel() == 1
    if method.startswith("dare") and len(shape) == 2:   # the kept fraction of a task vector is its density
        delta = inputs[0].float() - base.float()
        kept = sparsifiers.random(delta.clone(), 0.35, False, ctx, 0) != 0
        n = delta.numel() - int((delta == 0).sum())
        assert abs(float(kept.sum()) / n - 0.35) < 4 * math.sqrt(0.35 * 0.65 / n)


def test_ties_with_rescale_is_not_chunked():
    """TIES' rescale uses mergekit's single float32 L1 sums, which only the whole tensor reproduces."""
    ties = get_strategy("ties")
    assert ties.chunks({"rescale": True}) is None and ties.chunks({"rescale": False}) is not None
    for method in ("breadcrumbs", "della"):   # their masks come from one whole |delta| at a time (mask_chunks)
        assert all(get_strategy(method).chunks({"rescale": r}) is not None for r in (False, True))


def test_dare_draws_do_not_depend_on_chunk_order():
    ctx = TensorContext("w", 0, 0.0, seed=5)
    step = sparsifiers.DRAW_CHUNK
    forward = [sparsifiers.random_keep(ctx, 1, 0.5, s, s + step) for s in (0, step, 2 * step)]
    assert torch.equal(sparsifiers.random_keep(ctx, 1, 0.5, step, 2 * step), forward[1])
    assert not torch.equal(forward[0], forward[1])                             # each chunk its own stream
    assert not torch.equal(sparsifiers.random_keep(ctx, 0, 0.5, 0, step), forward[0])   # each model too
    other_seed = TensorContext("w", 0, 0.0, seed=6)
    assert not torch.equal(sparsifiers.random_keep(other_seed, 1, 0.5, 0, step), forward[0])


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big")
    for name, delta_seed in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), BIG, dtype=torch.bfloat16, seed=0, delta_seed=delta_seed, delta_scale=0.02,
                    max_shard_size=3_000_000)
    return root


def test_slerp_end_to_end_gives_mergekits_tensors(big_models, tmp_path):
    pytest.importorskip("mergekit")
    from test_mergekit_parity import assert_same, both

    spec = (f"merge_method: slerp\nbase_model: {big_models}/base\nmodels:\n  - model: {big_models}/base\n"
            f"  - model: {big_models}/ft-a\nparameters:\n  t: [0.2, 0.7]\n")
    ours, theirs = both(spec, tmp_path, max_shard_size=3_000_000)
    assert len(list(ours.glob("*.safetensors"))) >= 2
    assert_same(ours, theirs)


def test_dare_end_to_end_equals_the_whole_tensor_function(big_models, tmp_path, monkeypatch):
    """Every output tensor is the strategy's function on the whole float32 inputs, and one merging thread
    writes the same bytes as several."""
    import mergekit_lite.engine.loop as engine

    spec = (f"merge_method: dare_ties\nbase_model: {big_models}/base\nmodels:\n"
            f"  - model: {big_models}/ft-a\n    parameters: {{weight: 0.6, density: 0.4}}\n"
            f"  - model: {big_models}/ft-b\n    parameters: {{weight: 0.5, density: 0.7}}\n")
    run_merge(spec, tmp_path / "out", progress=False, seed=11, validate=False)
    monkeypatch.setattr(engine, "MAX_MERGE_THREADS", 1)
    run_merge(spec, tmp_path / "one", progress=False, seed=11, validate=False)
    out, one = read_folder(tmp_path / "out"), read_folder(tmp_path / "one")
    base, a, b = (read_folder(big_models / n) for n in ("base", "ft-a", "ft-b"))
    strategy = get_strategy("dare_ties")
    for name in (EMBED, "model.layers.0.mlp.up_proj.weight"):
        ctx = TensorContext(name, 0 if "layers" in name else None, 0.0, seed=11)
        whole = strategy([a[name].float(), b[name].float()], base[name].float(), ctx, weight=(0.6, 0.5),
                         density=(0.4, 0.7), normalize=False, rescale=True, **{"lambda": 1.0})
        assert torch.equal(out[name], whole.to(torch.bfloat16)), name
    assert all(torch.equal(out[n], one[n]) for n in out)
    changed = out[EMBED].float() - base[EMBED].float()
    assert 0.5 < float((changed != 0).float().mean()) < 0.95   # dropped entries where both models drew a drop


@pytest.mark.parametrize("method", ["slerp", "dare_ties", "ties"])
def test_nan_in_an_input_is_named_on_the_chunked_path(big_models, tmp_path, method):
    bad = tmp_path / "bad"
    shutil.copytree(big_models / "ft-a", bad)
    shard = next(f for f in sorted(bad.glob("*.safetensors")) if EMBED in load_file(f))
    tensors = load_file(shard)
    tensors[EMBED][5, 7] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    params = "parameters: {t: 0.5}\n" if method == "slerp" else ""
    weight = "" if method == "slerp" else "\n    parameters: {weight: 0.5, density: 0.5}"
    spec = f"merge_method: {method}\nbase_model: {big_models}/base\nmodels:\n  - model: {bad}{weight}\n{params}"
    with pytest.raises(ModelError) as error:
        run_merge(spec, tmp_path / "out", progress=False)
    assert str(error.value).startswith(f"{bad}: tensor '{EMBED}': the input already holds 1 NaN value, "
                                       "the first at [5, 7]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["slerp", "ties", "dare_linear"])
def test_float64_inputs_keep_float64_arithmetic(tmp_path, method):
    """float64 checkpoints are merged in float64 (whole tensors): the same bytes as the strategy's function
    on the float64 inputs, with float64 scalars (t, weights), as before chunking."""
    shape = LlamaShape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=512)
    for name, delta_seed in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(tmp_path / name), shape, dtype=torch.float64, seed=0, delta_seed=delta_seed,
                    tokenizer=False)
    if method == "slerp":
        others, params = ["ft-a"], {"t": 0.3}
        spec = (f"merge_method: slerp\nbase_model: {tmp_path}/base\nmodels:\n  - model: {tmp_path}/ft-a\n"
                "parameters: {t: 0.3}\n")
    else:
        others = ["ft-a", "ft-b"]
        entries = "".join(f"  - model: {tmp_path}/{m}\n    parameters: {{weight: 0.7, density: 0.4}}\n" for m in others)
        spec = f"merge_method: {method}\nbase_model: {tmp_path}/base\nmodels:\n{entries}"
        params = {p.name: p.default for p in get_strategy(method).params if not p.required}
        params.update(weight=(0.7, 0.7), density=(0.4, 0.4))
    run_merge(spec, tmp_path / "out", progress=False, validate=False)
    out = read_folder(tmp_path / "out")
    inputs = {m: read_folder(tmp_path / m) for m in ["base", *others]}
    strategy = get_strategy(method)
    for name in (EMBED, "model.layers.0.mlp.up_proj.weight"):
        assert out[name].dtype == torch.float64
        expected = strategy([inputs[m][name] for m in others], inputs["base"][name],
                            TensorContext(name, 0 if "layers" in name else None, 0.0), **params)
        assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(2100, 1300), (300, 7), (5,)])
@pytest.mark.parametrize("count", [3, 2])
def test_model_stock_chunks_equal_the_whole_path_and_the_formula(filter_wise, shape, count):
    """Model Stock over chunks (several for the largest shape; per row, chunks hold whole rows): the bytes of
    the whole-tensor path on 1 and 2 threads, and within float32 rounding of the formula computed here in
    float64 (mergekit's bits are test_parity_methods'): t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the task vectors (per row)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    common = torch.randn(shape, generator=g)
    inputs = [(base.float() + 0.02 * common + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
              for _ in range(count)]
    strategy = get_strategy("model_stock")
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0)
    whole = strategy([x.float() for x in inputs], base.float(), ctx, filter_wise=filter_wise)
    for threads in (1, 2):
        assert torch.equal(run_chunks(strategy.chunked, inputs, base, ctx, threads, filter_wise=filter_wise), whole)
    rows = (lambda x: x.double().reshape(-1, shape[-1]) if len(shape) >= 2 else x.double().view(1, -1)) \
        if filter_wise else (lambda x: x.double().view(1, -1))
    w0, ws = rows(base), [rows(x) for x in inputs]
    offsets = [w - w0 for w in ws]
    cosines = [torch.nn.functional.cosine_similarity(offsets[i], offsets[j], dim=1)
               for i in range(count) for j in range(i + 1, count)]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(1)
    t = count * cos / (1 + (count - 1) * cos)
    expected = (t * sum(ws) / count + (1 - t) * w0).view(shape)
    assert 0.05 < float(t.median()) < 0.95                          # a real interpolation, not an end point
    # float32 norms over 2.7M entries move t by about 1e-4; a wrong row's ratio would move entries by 1e-3
    assert float((whole.double() - expected).abs().max()) < 1e-4


def _heap() -> tuple[int, int]:
    """The [heap] mapping of this process: glibc's main arena."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                low, high = line.split()[0].split("-")
                return int(low, 16), int(high, 16)
    pytest.skip("no [heap] mapping")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("threads", [0, 2])
def test_per_chunk_results_are_kept_out_of_the_heap_with_their_values(threads):
    """A pass over several chunks keeps each chunk's small results (norms, sums, tuples of them) in pages of their
    own, not in the heap holes the chunks' float32 copies left: there, each pinned a chunk-sized hole and a pass over
    a 1B embedding grew the heap by 300-400 MB. Values, dtypes and shapes are the results' own."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(5 * (1 << 18) + 77, generator=g).to(torch.bfloat16)
    with ThreadPoolExecutor(max(threads, 1)) as pool:   # threads=0: on this thread, which allocates from the heap
        spread = (lambda fn, items: list(pool.map(fn, items))) if threads else in_order
        src = Chunks([raw], None, lambda start, values: None, lambda c: c.to(torch.float32), spread)

        def stats(start: int, end: int):
            chunk = src.input(0, start, end)
            return torch.linalg.vector_norm(chunk.view(1, -1), dim=1, keepdim=True), [chunk.sum().double(), None], 7

        parts = src.map(stats, 1 << 18)
    whole = raw.float()
    low, high = _heap()
    assert len(parts) == 6
    for i, (norm, (total, nothing), seven) in enumerate(parts):
        chunk = whole[i << 18:(i + 1) << 18]
        assert norm.shape == (1, 1) and norm.dtype == torch.float32
        assert torch.equal(norm, torch.linalg.vector_norm(chunk.view(1, -1), dim=1, keepdim=True))
        assert total.dtype == torch.float64 and total.item() == chunk.sum().double().item()
        assert nothing is None and seven == 7
        for tensor in (norm, total):   # (pool threads allocate from arenas of their own: no [heap] to test)
            assert threads or not low <= tensor.data_ptr() < high


def test_a_single_chunk_or_a_large_result_is_returned_as_made():
    """One chunk pins nothing between chunks, a result over PARKED is no pin, and a view is memory its caller
    holds (copying it would double that): all come back untouched."""
    from mergekit_lite.strategies import chunks

    raw = torch.arange(2 * (chunks.PARKED // 4) + 8, dtype=torch.float32)
    made = []
    src = Chunks([raw], None, lambda start, values: None)

    def copy(start: int, end: int) -> torch.Tensor:
        made.append(src.input(0, start, end).clone())
        return made[-1]

    one = src.map(copy, raw.numel())
    assert one[0] is made[0]
    large = src.map(copy, chunks.PARKED // 4 + 4)
    assert large[0] is made[1] and large[1] is made[2]
    total = torch.zeros(raw.numel())   # a pass that accumulates into a vector it holds returns views of it
    views = src.map(lambda start, end: total[start:end].add_(src.input(0, start, end)), 1 << 10)
    assert all(view.data_ptr() == total[i << 10:].data_ptr() for i, view in enumerate(views))
    assert torch.equal(total, raw)


def test_lists_of_numbers_are_returned_as_made():
    """DARE's norm pass returns each chunk's row sums, a thousand floats a chunk: they hold no heap, and walking
    them one by one held the interpreter lock for half a second of a 1B merge. The lists come back themselves;
    a list holding tensors is still parked."""
    raw = torch.arange(4 << 10, dtype=torch.float32)
    made = []
    src = Chunks([raw], None, lambda start, values: None)

    def sums(start: int, end: int):
        chunk = src.input(0, start, end).clone()
        made.append(([float(x) for x in chunk[:4]], [chunk.sum()]))
        return made[-1]

    parts = src.map(sums, 1 << 10)
    assert len(parts) == 4
    for (numbers, tensors), (own_numbers, own_tensors) in zip(parts, made):
        assert numbers is own_numbers
        assert tensors is not own_tensors and torch.equal(tensors[0], own_tensors[0])
