"""`merge extract`: a fine-tune's change as a PEFT LoRA adapter, checked against closed forms, PEFT and
mergekit-extract-lora 0.1.5 run on the same tiny sharded Llama models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        assert error <= mergekit[module] * (1 + 1e-5), (module, error, mergekit[module])
    ours_config = json.loads((ours / "adapter_config.json").read_text())
    theirs_config = json.loads((theirs / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "modules_to_save"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    whole = {k for k in adapter_tensors(theirs) if "lora_" not in k}
    assert {k for k in adapter_tensors(ours) if "lora_" not in k} == whole


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


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    """The randomized SVD (auto's choice for a small rank of a large matrix) is within 0.1% of the optimum."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(1024, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(1024, 256, generator=g))
    s = 1.0 / torch.arange(1, 257).float() ** 0.8
    delta = (u * s) @ v.T
    factors = decompose(delta, 16, svd="auto")
    assert factors.method == "randomized"
    assert relative_error(delta, factors) <= optimal_error(s, 16) * 1.001
    assert torch.equal(decompose(delta, 16).down, factors.down)   # same bytes on a second run (seeded)


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
                                                                   "adapter_model.safetensors", "merge_run.json"]
