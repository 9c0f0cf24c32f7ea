"""`merge extract`: a fine-tune's change as a PEFT LoRA adapter, checked against closed forms, PEFT and
mergekit-extract-lora 0.1.5 run on the same tiny sharded Llama models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers.models import SHARD, read_folder
from safetensors import safe_open

from mergekit_lite.lora.extract import decompose, optimal_error, rank_for, relative_error
from mergekit_lite.testing.synthetic import LlamaShape, write_model

SHAPE = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
RANK = 8
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extract")
    write_model(str(root / "base"), SHAPE, seed=0, max_shard_size=SHARD)
    write_model(str(root / "ft"), SHAPE, seed=0, delta_seed=1, delta_scale=0.01, max_shard_size=SHARD)
    assert (root / "ft" / "model.safetensors.index.json").exists(), "the models should be sharded"
    return root


def extract(cli, pair: Path, out: str, *extra: str) -> Path:
    result = cli("extract", "--model", pair / "ft", "--base-model", pair / "base", "-o", pair / out, "-q", *extra)
    assert result.exit_code == 0, result.output
    return pair / out


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}


def delta_errors(adapter: Path, pair: Path) -> dict[str, float]:
    """Per LoRA module: ||FT - (BASE + B @ A * scaling)||_F, scaling from the adapter's config."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors, ft, base = adapter_tensors(adapter), read_folder(pair / "ft"), read_folder(pair / "base")
    errors = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            r = config["rank_pattern"].get(module, config["r"])
            scaling = config["alpha_pattern"].get(module, config["lora_alpha"]) / r
            up, down = tensors[f"{module}.lora_B.weight"].float(), tensors[key].float()
            name = module + ".weight"
            errors[module] = torch.linalg.matrix_norm(ft[name] - base[name] - up @ down * scaling).item()
    return errors


def test_full_rank_folds_back_to_the_fine_tune(cli, pair):
    """(a) At full rank, `merge fold` and peft's merge_and_unload both give FT's tensors back (float32 rounding)."""
    adapter = extract(cli, pair, "full", "--max-rank", "128")
    result = cli("fold", pair / "base", adapter, "-o", pair / "folded", "-q", "--no-validate")
    assert result.exit_code == 0, result.output
    ft, folded = read_folder(pair / "ft"), read_folder(pair / "folded")
    assert folded.keys() == ft.keys()
    worst = max((folded[n] - ft[n]).abs().max().item() for n in ft)
    assert worst < 2e-7, worst   # weights ~0.02-1, changes ~0.01: a few float32 ulps

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    worst_peft = max((merged[n] - ft[n]).abs().max().item() for n in ft)
    assert worst_peft < 2e-7, worst_peft


def test_at_least_as_close_as_mergekit_extract_lora(cli, pair):
    """(b) At the same rank, every module's base + B @ A is as close to FT as mergekit-extract-lora's."""
    ours = extract(cli, pair, "ours8", "--max-rank", str(RANK), "--svd", "auto")
    theirs = pair / "mk8"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    script = Path(sys.executable).parent / "mergekit-extract-lora"
    done = subprocess.run([str(script), "--model", str(pair / "ft"), "--base-model", str(pair / "base"),
                           "--out-path", str(theirs), "--max-rank", str(RANK)], env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    mine, mergekit = delta_errors(ours, pair), delta_errors(theirs, pair)
    assert mine.keys() == mergekit.keys() and len(mine) == 7 * SHAPE.layers
    for module, error in mine.items():
        assert error <= mergekit[module] * (1 + 1e-6), (module, error, mergekit[module])
    ours_config = json.loads((ours / "adapter_config.json").read_text())
    theirs_config = json.loads((theirs / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "modules_to_save"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    whole = {k for k in adapter_tensors(theirs) if "lora_" not in k}
    assert {k for k in adapter_tensors(ours) if "lora_" not in k} == whole


WIDE = LlamaShape(hidden=512, intermediate=1024, layers=1, heads=8, kv_heads=8, vocab=256)


def test_default_svd_on_large_modules_gives_logits_as_close_as_mergekit(tmp_path):
    """The issue's measure: base + adapter against FT's logits on fixed inputs, at the same rank, with modules
    large enough (sides >= 512) that `--svd auto` takes the gram method while mergekit takes torch.linalg.svd."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    write_model(str(tmp_path / "base"), WIDE, seed=0, max_shard_size=SHARD)
    write_model(str(tmp_path / "ft"), WIDE, seed=0, delta_seed=1, delta_scale=0.01, max_shard_size=SHARD)
    from mergekit_lite import extract_lora

    ours = tmp_path / "ours"
    assert extract_lora(tmp_path / "ft", tmp_path / "base", ours, max_rank=16, progress=False).methods == {"gram": 7}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "mergekit-extract-lora"), "--model", str(tmp_path / "ft"),
                           "--base-model", str(tmp_path / "base"), "--out-path", str(tmp_path / "mk"),
                           "--max-rank", "16"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    mine, mergekit = delta_errors(ours, tmp_path), delta_errors(tmp_path / "mk", tmp_path)
    assert mine.keys() == mergekit.keys() and len(mine) == 7
    for module, error in mine.items():
        assert error <= mergekit[module] * (1 + 1e-5), (module, error, mergekit[module])
    tokens = torch.randint(0, WIDE.vocab, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(folder: Path, adapter: Optional[Path] = None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter) if adapter is not None else model
        with torch.no_grad():
            return model.eval()(tokens).logits

    target = logits(tmp_path / "ft")
    ours_gap = (logits(tmp_path / "base", ours) - target).norm().item()
    theirs_gap = (logits(tmp_path / "base", tmp_path / "mk") - target).norm().item()
    untouched = (logits(tmp_path / "base") - target).norm().item()
    assert ours_gap <= theirs_gap * (1 + 1e-4), (ours_gap, theirs_gap)
    assert ours_gap < untouched   # the adapter brings the base toward FT: the comparison means something


def test_peft_loads_the_adapter_and_agrees_with_our_fold(cli, pair):
    """(c) peft's base + adapter (unmerged forward) gives the logits of `merge fold`'s model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = extract(cli, pair, "peft8", "--max-rank", str(RANK), "--embed-lora", "--sv-epsilon", "1e-9")
    result = cli("fold", pair / "base", adapter, "-o", pair / "folded8", "-q", "--no-validate")
    assert result.exit_code == 0, result.output
    tokens = torch.randint(0, SHAPE.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair / "base", dtype=torch.float32),
                                      adapter).eval()
    folded = AutoModelForCausalLM.from_pretrained(pair / "folded8", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, ours = model(tokens).logits, folded(tokens).logits
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    assert "lora_embedding_A" in "".join(adapter_tensors(adapter))


def test_sv_epsilon_rank_closed_form():
    """(d) delta = U diag(s) V^T with known s: the rank is the count of s > epsilon, and the factors rebuild it."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 20, generator=g, dtype=torch.float64))
    s = torch.tensor([2.0 ** -i for i in range(20)], dtype=torch.float64)
    delta = (u * s) @ v.T
    for epsilon, expected in ((0.3, 2), (2.0 ** -9.5, 10), (0.0, 16)):
        factors = decompose(delta, 16, sv_epsilon=epsilon, svd="exact")
        assert factors.rank == expected == rank_for(s, 16, epsilon)
        assert relative_error(delta, factors) == pytest.approx(optimal_error(s, expected), rel=1e-9, abs=1e-12)
    both = decompose(delta, 4, distribute_scale=True, svd="exact")
    assert torch.allclose(both.down.norm(dim=1) ** 2, s[:4], rtol=1e-9)   # sqrt(S) in each factor
    plain = decompose(delta, 4, distribute_scale=False, svd="exact")
    assert torch.allclose(plain.up.norm(dim=0), torch.ones(4, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(plain.up @ plain.down, both.up @ both.down, atol=1e-12)


def test_sv_epsilon_writes_the_rank_pattern(cli, pair):
    """(d) Through the CLI: each module's rank is min(max-rank, #singular values > epsilon) of FT - BASE,
    computed here with torch.linalg.svdvals in float64; r is the largest, the others are the patterns."""
    ft, base = read_folder(pair / "ft"), read_folder(pair / "base")
    values = {n.removesuffix(".weight"): torch.linalg.svdvals((ft[n] - base[n]).double()) for n in ft
              if ft[n].dim() == 2 and "embed" not in n and "lm_head" not in n}
    epsilon = float(torch.cat(list(values.values())).median())
    expected = {m: min(24, int((s > epsilon).sum())) for m, s in values.items()}
    adapter = extract(cli, pair, "eps", "--max-rank", "24", "--sv-epsilon", repr(epsilon), "--svd", "exact")
    config = json.loads((adapter / "adapter_config.json").read_text())
    top = max(expected.values())
    assert config["r"] == config["lora_alpha"] == top
    assert config["rank_pattern"] == {m: r for m, r in expected.items() if r != top} == config["alpha_pattern"]
    assert len(set(expected.values())) > 1   # the test means something: ranks differ between modules


def spectrum_matrix(rows: int, cols: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 U diag(s) V^T with random orthonormal U (rows, len(s)) and V (cols, len(s))."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


@pytest.mark.parametrize("rows, cols, kind", [(1024, 512, "flat"), (512, 768, "flat"), (768, 512, "decaying"),
                                              (512, 1024, "decaying")])
def test_auto_is_as_close_as_the_exact_svd(rows, cols, kind):
    """(a) auto takes the Gram method for a large matrix; its rank-r error is the exact SVD's (torch.linalg.svd,
    mergekit's) and the optimum's (Eckart-Young from float64 svdvals) within 1e-5, on a noise-like and a
    decaying (s_i ~ i^-0.8) spectrum, tall and wide."""
    if kind == "flat":
        delta = 0.01 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    else:
        delta = spectrum_matrix(rows, cols, 1.0 / torch.arange(1, min(rows, cols) + 1) ** 0.8, seed=rows)
    optimum = torch.linalg.svdvals(delta.double())
    for rank in (8, 48):
        auto, exact = decompose(delta, rank), decompose(delta, rank, svd="exact")
        assert (auto.method, exact.method, auto.rank) == ("gram", "exact", rank)
        error = relative_error(delta, auto)
        assert error <= relative_error(delta, exact) * (1 + 1e-5), (error, relative_error(delta, exact))
        assert error <= optimal_error(optimum, rank) * (1 + 1e-5), (error, optimal_error(optimum, rank))
        assert torch.allclose(auto.singular_values[:rank].double(), optimum[:rank], rtol=1e-5)
        assert auto.singular_values.shape == optimum.shape   # all of them, largest first
        assert torch.allclose(auto.down.norm(dim=1) ** 2, auto.singular_values[:rank], rtol=1e-5)   # sqrt(S) each
    both, plain = decompose(delta, 8), decompose(delta, 8, distribute_scale=False)
    assert torch.allclose(plain.up.norm(dim=0), torch.ones(8), rtol=1e-5)
    product = both.up @ both.down
    assert torch.allclose(plain.up @ plain.down, product, rtol=0, atol=1e-5 * float(product.abs().max()))


def test_gram_falls_back_to_the_exact_svd_when_little_is_left():
    """(b) A steep spectrum (s_i ~ i^-2) at rank 64 leaves a relative residual of ~1e-3 < 0.01, where the Gram
    matrix's rounding would cost accuracy: auto (and an explicit gram) run torch.linalg.svd and say so."""
    delta = spectrum_matrix(640, 512, 1.0 / torch.arange(1, 513) ** 2.0, seed=3)
    optimum = optimal_error(torch.linalg.svdvals(delta.double()), 64)
    assert optimum < 0.01
    for svd in ("auto", "gram"):
        factors = decompose(delta, 64, svd=svd)
        assert factors.method == "exact" and factors.rank == 64
        assert torch.equal(factors.down, decompose(delta, 64, svd="exact").down)
    assert decompose(delta, 8).method == "gram"   # at rank 8 plenty is left (~0.025): the Gram method


def test_unchanged_and_rank_deficient_changes():
    """(c) A zero change gives rank 0 (the module is left out); an exactly rank-3 change with max-rank 8 gives
    rank 3 and rebuilds it within float32 rounding, by every method, with sv_epsilon 0: the other singular
    values are rounding noise (~1e-7 of the largest for the exact SVD, ~1e-4 from the Gram eigenvalues)."""
    zero = torch.zeros(768, 512)
    for svd in ("auto", "exact", "gram"):
        factors = decompose(zero, 8, svd=svd)
        assert factors.rank == 0 and factors.down.shape == (0, 512) and factors.up.shape == (768, 0)
        assert not factors.singular_values.any()
    g = torch.Generator().manual_seed(4)
    for rows, cols in ((768, 512), (512, 768)):
        delta = torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
        for svd in ("auto", "exact", "gram", "randomized"):
            factors = decompose(delta, 8, svd=svd)
            assert factors.rank == 3, (svd, factors.singular_values[:8])
            assert relative_error(delta, factors) < 1e-5, (svd, relative_error(delta, factors))


def test_sv_epsilon_counts_the_gram_methods_accurate_values():
    """(c) On the Gram path the rank is the count of singular values > sv_epsilon, as float64 svdvals count them."""
    s = torch.linspace(1.0, 0.05, 512)
    delta = spectrum_matrix(1024, 512, s, seed=5)
    values = torch.linalg.svdvals(delta.double())
    for epsilon in (0.7, float(values[40] + values[41]) / 2, 0.0):
        factors = decompose(delta, 64, sv_epsilon=epsilon)
        assert factors.method == "gram"
        assert factors.rank == min(64, int((values > epsilon).sum())) == rank_for(values, 64, epsilon)


def test_randomized_svd_is_close_on_a_decaying_spectrum():
    """(d) The randomized SVD, now only on request (--svd randomized), is within 0.1% of the optimum on a
    decaying spectrum, and seeded: the same bytes on a second run."""
    delta = spectrum_matrix(1024, 1024, 1.0 / torch.arange(1, 257).float() ** 0.8, seed=1)
    s = torch.linalg.svdvals(delta.double())
    factors = decompose(delta, 16, svd="randomized")
    assert factors.method == "randomized" and decompose(delta, 16).method == "gram"
    assert relative_error(delta, factors) <= optimal_error(s, 16) * 1.001
    assert torch.equal(decompose(delta, 16, svd="randomized").down, factors.down)


def test_dry_run_writes_nothing_and_library_call(pair):
    from mergekit_lite import extract_lora

    result = extract_lora(pair / "ft", pair / "base", pair / "dry", max_rank=4, dry_run=True)
    assert "Would extract 14 module(s) as LoRA (rank <= 4)" in result.summary
    assert not (pair / "dry").exists() and not (pair / "dry.partial").exists()
    done = extract_lora(pair / "ft", pair / "base", pair / "lib", max_rank=4, include_regexes=["layers\\.0\\."],
                        skip_undecomposable=True)
    assert set(done.ranks) == {f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                             "mlp.up_proj", "mlp.down_proj")}
    config = json.loads((pair / "lib" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(done.ranks)   # full names: layer 1 has no LoRA
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    again = extract_lora(pair / "ft", pair / "base", pair / "lib", max_rank=2, overwrite=True)
    assert again.rank == 2 and sorted(os.listdir(pair / "lib")) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors", "adapter_record.json",
                                                                   "merge_run.json"]
