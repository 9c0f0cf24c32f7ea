"""Sparsifiers: magnitude selection without sorting keeps exactly mergekit's entries (ties aside, which
it breaks as a stable sort would), and the random ones have the statistics their papers promise."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_strategies import STRATEGIES, call

from mergekit_lite.strategies import sparsifiers
from mergekit_lite.strategies.sparsifiers import kth_smallest, rank_window
from mergekit_lite.strategy import TensorContext


def stable_window(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """The reference: positions lo..hi-1 of a stable sort."""
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.sort(values, descending=descending, stable=True).indices[max(lo, 0):max(hi, 0)]] = True
    return keep


def sample(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        return torch.randn(n, generator=g).abs()
    if kind == "bf16 deltas":      # differences of bfloat16 weights: many equal magnitudes
        base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
        return ((base + 0.002 * torch.randn(n, generator=g)).bfloat16().float() - base).abs()
    return torch.randint(0, 4, (n,), generator=g).float()   # "few values": huge groups of ties


def spreads(name: str, pool: ThreadPoolExecutor):
    """How a pass's slices run: here in order (None), here last slice first (results still in order), or on
    two threads."""
    if name == "reversed":
        return lambda fn, items: [fn(item) for item in reversed(items)][::-1]
    return (lambda fn, items: list(pool.map(fn, items))) if name == "threads" else None


@pytest.mark.parametrize("kind", ["distinct", "bf16 deltas", "few values"])
@pytest.mark.parametrize("n", [1, 7, 300, 40_000])   # 40_000 takes the radix-select path
@pytest.mark.parametrize("piece", [1 << 22, 999])     # masks and counts made in slices of this many entries
@pytest.mark.parametrize("spread", [None, "reversed", "threads"])
def test_rank_window_is_a_stable_sort_window(kind, n, piece, spread, monkeypatch):
    monkeypatch.setattr(sparsifiers, "_SLICE", piece)
    values = sample(kind, n, seed=n)
    g = torch.Generator().manual_seed(1)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(6):
            lo, hi = sorted(torch.randint(-2, n + 3, (2,), generator=g).tolist())
            for descending in (True, False):
                assert torch.equal(rank_window(values, lo, hi, descending, spreads(spread, pool)),
                                   stable_window(values, lo, hi, descending))


@pytest.mark.parametrize("kind", ["distinct", "bf16 deltas", "few values"])
@pytest.mark.parametrize("piece", [1 << 22, 4099])
@pytest.mark.parametrize("spread", [None, "reversed", "threads"])
def test_radix_select_equals_kthvalue(kind, piece, spread, monkeypatch):
    monkeypatch.setattr(sparsifiers, "_SLICE", piece)
    values = sample(kind, 200_003, seed=5)
    ks = [1, 2, 100_000, 199_999, 200_003]
    with ThreadPoolExecutor(2) as pool:
        found = kth_smallest(values, ks, spreads(spread, pool))
    assert [float(v) for v in found] == [float(torch.kthvalue(values, k).values) for k in ks]


def _mergekit_sparsify():
    pytest.importorskip("mergekit")
    from mergekit import sparsify

    return sparsify


@pytest.fixture
def stable_mergekit_sort(monkeypatch):
    """mergekit's sparsifiers, with their argsort/sort made stable (ties broken by position, as ours)."""
    sparsify = _mergekit_sparsify()

    class StableTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def argsort(x, dim=-1, descending=False, **_):
            return torch.sort(x, dim=dim, descending=descending, stable=True).indices

        @staticmethod
        def sort(x, dim=-1, descending=False, **_):
            return torch.sort(x, dim=dim, descending=descending, stable=True)

    monkeypatch.setattr(sparsify, "torch", StableTorch())
    return sparsify


def delta_sample(kind: str, shape=(300, 260), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    model = base + 0.002 * torch.randn(shape, generator=g)
    if kind == "bf16 deltas":
        base, model = base.bfloat16().float(), model.bfloat16().float()
    return model - base


@pytest.mark.parametrize("kind", ["distinct", "bf16 deltas"])
@pytest.mark.parametrize("density", [0.0, 1e-6, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_equals_mergekit_with_a_stable_sort(stable_mergekit_sort, kind, density, rescale):
    delta = delta_sample(kind)
    theirs = stable_mergekit_sort.magnitude(delta, density, "l1" if rescale else None)
    ours = sparsifiers.magnitude(delta.clone(), density, rescale)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.2), (0.9, 0.3), (0.0, 0.1), (0.2, 0.0), (1.0, 0.5)])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_outliers_equal_mergekit_with_a_stable_sort(stable_mergekit_sort, density, gamma, rescale):
    delta = delta_sample("bf16 deltas")
    theirs = stable_mergekit_sort.magnitude_outliers(delta, density, "l1" if rescale else None, gamma)
    ours = sparsifiers.magnitude_outliers(delta.clone(), density, gamma, rescale)
    assert torch.equal(ours, theirs)


def test_against_mergekits_own_sort_only_tied_entries_differ():
    """Without the patch mergekit's argsort orders equal magnitudes its own way: the same number of entries is
    kept, every difference is an entry whose magnitude equals the cut, and the kept values are otherwise equal."""
    sparsify = _mergekit_sparsify()
    delta = delta_sample("bf16 deltas")
    theirs = sparsify.magnitude(delta, 0.3, None)
    ours = sparsifiers.magnitude(delta.clone(), 0.3, False)
    k = int(0.3 * delta.numel())
    assert int(torch.count_nonzero(ours)) == int(torch.count_nonzero(theirs)) == int(torch.count_nonzero(
        delta.flatten()[torch.sort(delta.abs().flatten(), descending=True, stable=True).indices[:k]]))
    differ = ours != theirs
    assert bool(differ.any()), "this sample was built to have ties at the cut"
    cut = torch.sort(delta.abs().flatten(), descending=True).values[k - 1]
    assert bool((delta.abs()[differ] == cut).all())
    assert torch.equal(ours[~differ], theirs[~differ])
    # On distinct magnitudes there is nothing to break: identical.
    distinct = delta_sample("distinct")
    assert torch.equal(sparsifiers.magnitude(distinct.clone(), 0.3, False), sparsify.magnitude(distinct, 0.3, None))


def draws(name: str, seeds: range, density: float, shape=(256, 512), **params):
    """Pruned task vectors of one model, over several run seeds."""
    delta = delta_sample("distinct", shape)
    gen = (lambda s: TensorContext("w", 0, 0.0, s).generator())
    for seed in seeds:
        if name == "random":
            yield delta, sparsifiers.random(delta.clone(), density, ctx=TensorContext("w", 0, 0.0, seed), model=0,
                                            **params)
        else:
            yield delta, sparsifiers.della_magprune(delta.clone(), density, generator=gen(seed), **params)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_density_and_preserves_the_l1_norm(density):
    for delta, pruned in draws("random", range(3), density, rescale=True):
        n = delta.numel()
        kept = int(torch.count_nonzero(pruned))
        assert abs(kept / n - density) < 4 * math.sqrt(density * (1 - density) / n)
        assert math.isclose(pruned.abs().double().sum(), delta.abs().double().sum(), rel_tol=1e-6)
        survivors = pruned != 0
        ratio = pruned[survivors] / delta[survivors]          # one common factor, close to 1 / density
        assert float(ratio.max() - ratio.min()) < 1e-5
        assert abs(float(ratio.mean()) * density - 1) < 5 * math.sqrt((1 - density) / (density * n))


def test_dare_without_rescale_keeps_values_unchanged():
    for delta, pruned in draws("random", range(2), 0.4, rescale=False):
        survivors = pruned != 0
        assert torch.equal(pruned[survivors], delta[survivors])


def test_dare_expectation_over_seeds_is_task_arithmetic():
    """Averaged over run seeds, dare_linear (rescale on) approaches task arithmetic: error ~ 1/sqrt(seeds)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g) * 0.02
    inputs = [base + 0.002 * torch.randn(64, 64, generator=g) for _ in range(2)]
    ta = call(STRATEGIES["task_arithmetic"], inputs, base, weight=(0.6, 0.4))
    seeds = 400
    mean = sum(call(STRATEGIES["dare_linear"], inputs, base, seed=s, weight=(0.6, 0.4), density=0.3)
               for s in range(seeds)) / seeds
    error = float((mean - ta).norm() / (ta - base).norm())
    # One draw's relative error is about sqrt((1 - p) / p) = 1.53; the mean of 400 about 1.53 / 20.
    assert error < 1.5 * math.sqrt(0.7 / 0.3) / math.sqrt(seeds)
    single = call(STRATEGIES["dare_linear"], inputs, base, seed=0, weight=(0.6, 0.4), density=0.3)
    assert float((single - ta).norm() / (ta - base).norm()) > 1.0


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.25), (0.8, 0.1)])
def test_della_keep_probability_rises_with_magnitude(density, epsilon):
    for delta, pruned in draws("della", range(2), density, epsilon=epsilon, rescale=True):
        n = delta.numel()
        kept = pruned != 0
        assert abs(float(kept.float().mean()) - density) < 4 * math.sqrt(0.25 / n)
        assert math.isclose(pruned.abs().double().sum(), delta.abs().double().sum(), rel_tol=1e-6)
        # Per row: the smallest tenth of magnitudes is kept with probability ~ density - 0.9 epsilon,
        # the largest tenth with ~ density + 0.9 epsilon.
        ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
        low, high = kept[ranks < 0.1].float().mean(), kept[ranks >= 0.9].float().mean()
        tolerance = 4 * math.sqrt(0.25 / (n / 10))
        assert abs(float(low) - (density - 0.9 * epsilon)) < tolerance
        assert abs(float(high) - (density + 0.9 * epsilon)) < tolerance


def test_della_one_dimensional_and_single_entry_rows():
    g = TensorContext("w", 0, 0.0, 0).generator()
    vector = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    kept = sparsifiers.della_magprune(vector.clone(), 0.5, 0.2, False, g) != 0
    order = vector.abs().argsort()
    assert float(kept[order[:1000]].float().mean()) < 0.4 < 0.6 < float(kept[order[-1000:]].float().mean())
    column = torch.randn(5000, 1, generator=torch.Generator().manual_seed(2))   # rows of one entry: p = density
    kept = sparsifiers.della_magprune(column.clone(), 0.3, 0.2, False, g) != 0
    assert abs(float(kept.float().mean()) - 0.3) < 4 * math.sqrt(0.21 / 5000)


def test_l1_norm_is_exact_enough_and_thread_independent():
    values = torch.randn(3_000_001, generator=torch.Generator().manual_seed(3))
    exact = math.fsum(values.double().abs().tolist())
    threads = torch.get_num_threads()
    try:
        norms = set()
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            norms.add(sparsifiers.l1_norm(values))
    finally:
        torch.set_num_threads(threads)
    assert len(norms) == 1 and abs(norms.pop() - exact) < 1e-7 * exact


@pytest.mark.parametrize("shape", [(300, 50), (40, 6, 5), (77,)])
def test_della_mask_is_one_draw_of_the_whole_shape_in_any_block_of_rows(shape):
    """della_keep works a block of rows at a time (memory); the mask equals one torch.rand of the whole shape
    compared with the band computed from each entry's rank along dim 1, whatever the block."""
    magnitudes = torch.randn(shape, generator=torch.Generator().manual_seed(2)).abs()
    magnitudes[..., :3] = 0.5                                         # equal values: ranked by position
    with ThreadPoolExecutor(2) as pool:   # blocks ranked on two threads, a wave of them at a time
        spread = lambda fn, items: list(pool.map(fn, items))  # noqa: E731
        masks = [sparsifiers.della_keep(magnitudes, 0.4, 0.2, torch.Generator().manual_seed(7), block=b,
                                        spread=s, wave=w)
                 for b in (1, 7 * 50, 1 << 20) for s, w in ((None, 8), (spread, 3))]
    rows = magnitudes if magnitudes.dim() >= 2 else magnitudes.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1, stable=True).float()
    band = 0.4 - 0.2 + 2 * 0.2 * ranks / (rows.shape[1] - 1)
    draws = torch.rand(rows.shape, generator=torch.Generator().manual_seed(7))
    expected = (draws < band).view(shape)
    assert all(torch.equal(mask, expected) for mask in masks)
    assert 0 < int(expected.sum()) < expected.numel()


def _ranks_by_sorting_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1, stable=True).to(torch.int32)


@pytest.mark.parametrize("case", ["ties", "zeros and inf", "one column", "negative", "nan", "minus zero",
                                  "three dims", "float64"])
def test_row_ranks_are_a_stable_sort_of_each_row(case):
    """DELLA's ranks: one integer sort of (row, bits) for non-negative float32 rows; each row sorted otherwise.
    Equal values rank by position either way."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(37, 301, generator=g).abs()
    rows[:, ::4] = rows[:, 1:2]                       # a group of equal values in every row
    if case == "zeros and inf":
        rows[::3, 5:60] = 0.0
        rows[1::5, 7:9] = float("inf")
    elif case == "one column":
        rows = rows[:, :1].contiguous()
    elif case == "negative":
        rows[3, 4:6] = torch.tensor([-1.0, -2.0])      # as integers, negative floats order backwards
    elif case == "nan":
        rows[3, 4] = float("nan")
    elif case == "minus zero":
        rows[:, 10:20] = 0.0
        rows[2, 15] = -0.0                            # equal to +0: ranked by position, not by its sign bit
    elif case == "three dims":
        rows = rows.view(37, 7, 43)
    elif case == "float64":
        rows = rows.double()
    ranks = sparsifiers._row_ranks(rows)
    assert ranks.dtype == torch.int32 and ranks.shape == rows.shape
    if case != "nan":
        assert torch.equal(ranks, _ranks_by_sorting_rows(rows))
    else:   # NaN last, as torch sorts it
        assert int(ranks[3, 4]) == rows.shape[1] - 1 and torch.equal(ranks[4:], _ranks_by_sorting_rows(rows[4:]))


ONE, NEXT_UP, TWO_UP = 0x3F800000, 0x3F800001, 0x3F800002   # 1.0 and the floats right above it


@pytest.mark.parametrize("row_4, in_order", [
    ({10: ONE, 11: NEXT_UP}, True),
    ({10: NEXT_UP, 11: ONE}, False),                     # set dropped bits before the group's plain value
    ({10: ONE, 11: TWO_UP, 12: NEXT_UP}, False),         # two with set bits out of order
    ({10: ONE, 20: ONE, 30: NEXT_UP, 40: TWO_UP}, True),
    ({10: ONE, 20: NEXT_UP, 30: ONE}, False),            # the value after it in the row is sorted next
    ({300: 0x7F7FFFFF}, True),                           # the row's largest: nothing after it in its row
])
def test_packed_rank_keys_sort_again_the_rows_where_dropped_bits_decide(row_4, in_order, monkeypatch):
    """The int32 keys drop each value's lowest bits to make room for the row: values that differ only there
    share a key and keep their positions' order. Where that is their values' order the packed sort stands; where
    it is not, that row (and no other) is sorted again by its full bits. The ranks are a stable sort of each row
    either way."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(37, 301, generator=g).abs()              # 37 rows: the keys drop 6 bits
    rows = rows.view(torch.int32).bitwise_and(~0x3F).view(torch.float32)   # which no other value has set
    rows[5, 0] = 0.0                                            # the next row starts below row 4's largest
    for column, value in row_4.items():
        rows[4, column] = torch.tensor(value, dtype=torch.int32).view(torch.float32)
    again = []
    rerank = sparsifiers._rerank
    monkeypatch.setattr(sparsifiers, "_rerank", lambda bits, ranks, which: again.append(which.tolist()) or
                        rerank(bits, ranks, which))
    ranks = sparsifiers._row_ranks(rows)
    assert again == ([] if in_order else [[4]])
    assert torch.equal(ranks, _ranks_by_sorting_rows(rows))


@pytest.mark.parametrize("wanted", [[7], [3, 7], [0, 3, 7]])
def test_bucket_members_are_found_alike_in_numpy_and_torch(wanted):
    """The radix select takes its buckets' entries with NumPy on the CPU and with torch on a GPU: the same
    positions, ascending."""
    values = torch.randint(0, 9, (10_001,), generator=torch.Generator().manual_seed(2), dtype=torch.int16)
    expected = torch.tensor([i for i, v in enumerate(values.tolist()) if v in wanted], dtype=torch.int64)
    assert torch.equal(sparsifiers._where_in(values.numpy(), wanted), expected)
    assert torch.equal(sparsifiers._where_in(values, wanted), expected)
