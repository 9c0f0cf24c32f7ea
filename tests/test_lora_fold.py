"""LoRA folding without peft: closed forms, the reference grammar, base+adapter inside any merge, the library
and CLI, and the memory a fold needs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import SHAPE, read_folder
from safetensors.torch import load_file

from mergekit_lite import fold_lora, run_merge
from mergekit_lite.lora.config import pattern_key
from mergekit_lite.spec.references import AdapterRef, ModelPath, ModelRef, parse_reference
from mergekit_lite.testing.adapters import DEMO_ADAPTERS, AdapterShape, write_adapter
from mergekit_lite.testing.synthetic import LlamaShape, parameter_count, write_model

PREFIX = "base_model.model."
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: Path(write_adapter(str(root / name), SHAPE, shape, seed=i + 1))
            for i, (name, shape) in enumerate(DEMO_ADAPTERS.items())}


def test_pattern_keys_match_like_peft():
    patterns = {"q_proj": 4, "^model.layers.1.mlp.down_proj": 2, "layers.0.mlp.up_proj": 40}
    assert pattern_key(patterns, "model.layers.3.self_attn.q_proj") == "q_proj"        # a dotted suffix
    assert pattern_key(patterns, "model.layers.3.self_attn.xq_proj") == "model.layers.3.self_attn.xq_proj"
    assert pattern_key(patterns, "model.layers.1.mlp.down_proj") == "^model.layers.1.mlp.down_proj"   # anchored
    assert pattern_key(patterns, "model.layers.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"    # no match
    assert pattern_key(patterns, "model.layers.0.mlp.up_proj") == "layers.0.mlp.up_proj"
    assert pattern_key(patterns, "model.layers.10.mlp.up_proj") == "model.layers.10.mlp.up_proj"
    assert pattern_key({"proj": 1, "q_proj": 2}, "a.q_proj") == "q_proj"     # keys match whole components
    assert pattern_key({".*_proj": 1, "q_proj": 2}, "a.q_proj") == ".*_proj"  # the first match in file order wins


def test_reference_forms(tmp_path):
    ref = parse_reference("org/base@v1+org/chat+org/code@main", "models[0].model")
    assert ref == ModelRef(ModelPath("org/base", "v1"),
                           (AdapterRef(ModelPath("org/chat")), AdapterRef(ModelPath("org/code", "main"))))
    assert ref.adapter == ModelPath("org/chat") and str(ref) == "org/base@v1+org/chat+org/code@main"
    ref = parse_reference({"model": "org/base", "lora": [{"path": "org/chat@r2", "weight": 0.5},
                                                          {"path": "org/code", "check_base": False}],
                           "tied_embeddings": "shared"}, "m")
    assert ref.adapters == (AdapterRef(ModelPath("org/chat", "r2"), 0.5), AdapterRef(ModelPath("org/code"), 1.0, False))
    assert ref.tied_embeddings == "shared" and str(ref) == "org/base+org/chat@r2*0.5+org/code"
    assert parse_reference({"model": {"path": "org/base"}, "lora": {"path": "org/a", "revision": "x"}}, "m").adapters \
        == (AdapterRef(ModelPath("org/a", "x")),)   # mergekit's dict form


def test_weighted_fold_closed_form(models_f32, adapters, tmp_path):
    """W + w * (alpha/sqrt(r)) * B @ A for the rsLoRA adapter, computed in float64; untouched tensors as stored."""
    base = read_folder(models_f32 / "base")
    got = fold_lora(models_f32 / "base", adapters["code"], weights=[0.4])
    factors = load_file(str(adapters["code"] / "adapter_model.safetensors"))
    scaling = 32 / math.sqrt(16)
    changed = 0
    for name, tensor in got.items():
        module = name.removesuffix(".weight")
        if PREFIX + module + ".lora_A.weight" not in factors:
            assert torch.equal(tensor, base[name]), name
            continue
        up = factors[PREFIX + module + ".lora_B.weight"].double()
        down = factors[PREFIX + module + ".lora_A.weight"].double()
        expected = base[name].double() + 0.4 * scaling * (up @ down)
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=2e-7 * expected.abs().max().item())
        changed += 1
    assert changed == 4 * 7


def test_trained_replacement_applied_by_weight(models_f32, tmp_path):
    """A trained full tensor (modules_to_save) replaces the base at weight 1, and moves it part way otherwise."""
    folder = write_adapter(str(tmp_path / "head"), SHAPE, AdapterShape(("q_proj",)), seed=5)
    factors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    trained = torch.randn(SHAPE.vocab, SHAPE.hidden, generator=torch.Generator().manual_seed(0))
    from safetensors.torch import save_file

    save_file({**factors, PREFIX + "lm_head.weight": trained}, os.path.join(folder, "adapter_model.safetensors"))
    base = read_folder(models_f32 / "base")["lm_head.weight"]
    assert torch.equal(fold_lora(models_f32 / "base", folder)["lm_head.weight"], trained)
    partial = fold_lora(models_f32 / "base", folder, weights=[0.25])["lm_head.weight"]
    torch.testing.assert_close(partial, base + 0.25 * (trained - base), rtol=1e-6, atol=1e-6)


def test_folded_sources_feed_any_strategy(models_bf16, adapters, tmp_path):
    """task_arithmetic over base+adapter refs equals task_arithmetic over the folds written to disk first:
    folding is a transform of the source, not a step of its own."""
    base = models_bf16 / "base"
    for name in ("chat", "code"):
        fold_lora(base, adapters[name], tmp_path / f"folded-{name}", progress=False)
    spec = ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            "  - model: {a}\n    parameters: {{weight: 0.6}}\n"
            "  - model: {b}\n    parameters: {{weight: 0.9}}\n"
            "  - model: {c}\n    parameters: {{weight: 0.3}}\n"
            "parameters: {{lambda: 0.8}}\n")
    run_merge(spec.format(base=base, a=f"{base}+{adapters['chat']}", b=f"{base}+{adapters['code']}",
                          c=models_bf16 / "ft-a"), tmp_path / "live", progress=False)
    run_merge(spec.format(base=base, a=tmp_path / "folded-chat", b=tmp_path / "folded-code", c=models_bf16 / "ft-a"),
              tmp_path / "staged", progress=False)
    live, staged = read_folder(tmp_path / "live"), read_folder(tmp_path / "staged")
    assert live.keys() == staged.keys() and all(torch.equal(live[k], staged[k]) for k in live)
    assert not torch.equal(live["model.layers.0.self_attn.q_proj.weight"],
                           read_folder(base)["model.layers.0.self_attn.q_proj.weight"])


def test_fold_output_and_replay(cli, models_bf16, adapters, tmp_path, tiny_shards):
    """merge fold writes a complete model folder whose mergekit_config.yml replays to the same bytes, and equals
    fold_lora's in-memory result."""
    base = models_bf16 / "base"
    result = cli("fold", base, adapters["chat"], adapters["style"], "-o", tmp_path / "out", "--weight", "0.5",
                 "--weight", "1", "--max-shard-size", "50kB")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Folded 39 tensors")
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names and "config.json" in names
    got = read_folder(out)
    memory = fold_lora(base, [adapters["chat"], adapters["style"]], weights=[0.5, 1.0])
    assert got.keys() == memory.keys() and all(torch.equal(got[k], memory[k]) for k in got)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert f"Base model: `{base}` (local)\n\nAdapters, folded in order:\n\n- `{adapters['chat']}` (local) " \
           f"(weight 0.5)\n- `{adapters['style']}` (local)\n" in card
    assert "the LoRA adapters were folded into the base as each tensor was read" in card
    replay = cli("run", out / "mergekit_config.yml", "-o", tmp_path / "replay", "--quiet")
    assert replay.exit_code == 0, replay.output
    again = read_folder(tmp_path / "replay")
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_fold_dry_run(cli, models_f32, adapters, tmp_path):
    result = cli("fold", models_f32 / "base", adapters["chat"], "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0
    assert f"  {models_f32 / 'base'}+{adapters['chat']}: 39 tensors" in result.stdout
    assert result.stdout.rstrip().endswith("dry run: everything checked, nothing written")
    assert not (tmp_path / "out").exists()


def test_tied_base_untied_by_default(models_tied, tmp_path):
    """An lm_head adapter on a tied base: lm_head is written separately (= embedding + delta), the embedding
    stays as it was, and config.json says untied; shared folds the delta into the one embedding instead."""
    folder = write_adapter(str(tmp_path / "head"), LlamaShape(**{**SHAPE.__dict__, "tied": True}),
                           AdapterShape(("q_proj",)), seed=8)
    factors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    factors[PREFIX + "lm_head.lora_A.weight"] = torch.randn(8, SHAPE.hidden, generator=generator)
    factors[PREFIX + "lm_head.lora_B.weight"] = torch.randn(SHAPE.vocab, 8, generator=generator) * 0.01
    from safetensors.torch import save_file

    save_file(factors, os.path.join(folder, "adapter_model.safetensors"))
    base = read_folder(models_tied / "base")
    embed = base["model.embed_tokens.weight"]
    delta = 2.0 * (factors[PREFIX + "lm_head.lora_B.weight"] @ factors[PREFIX + "lm_head.lora_A.weight"])
    untied = fold_lora(models_tied / "base", folder)
    assert torch.equal(untied["model.embed_tokens.weight"], embed)
    assert torch.equal(untied["lm_head.weight"], embed + delta)
    shared = fold_lora(models_tied / "base", folder, tied_embeddings="shared")
    assert "lm_head.weight" not in shared and torch.equal(shared["model.embed_tokens.weight"], embed + delta)
    # strict=False: the adapter's config targets q_proj only, so peft (the forward check's reference) ignores
    # the lm_head factors added above, which the fold applies: the check rightly finds different logits
    with pytest.warns(UserWarning, match="Validation FAILED"):
        fold_lora(models_tied / "base", folder, tmp_path / "out", progress=False, strict=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


MEMORY_SCRIPT = """
import resource, sys
from mergekit_lite.plan.inputs import open_reference
from mergekit_lite.spec.references import parse_reference
source = open_reference(parse_reference(sys.argv[1], "model"), "model")   # headers only
if sys.argv[2] == "fold":
    from mergekit_lite import fold_lora
    fold_lora(sys.argv[3], sys.argv[4], sys.argv[5], progress=False, max_shard_size="20MB", validate=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_fold_memory_stays_near_the_largest_tensor(tmp_path):
    """Folding a 100 MB base in 2 MB shards adds a few tensors' worth to the process's peak memory, not the
    model: peak RSS of a fold minus that of a process that only opened the inputs."""
    shape = LlamaShape(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, vocab=2048)
    base = write_model(str(tmp_path / "base"), shape, max_shard_size=2_000_000, tokenizer=False)
    adapter = write_adapter(str(tmp_path / "adapter"), shape, DEMO_ADAPTERS["code"])
    model_bytes = parameter_count(shape) * 4
    largest = 4 * max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ref = f"{base}+{adapter}"

    def peak(*args: str) -> int:
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, ref, *args], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    baseline, folding = peak("open"), peak("fold", base, adapter, str(tmp_path / "out"))
    assert model_bytes > 100e6 and largest < 7e6
    assert load_file_keys(tmp_path / "out") == load_file_keys(base)
    print(f"peak RSS: {baseline / 1e6:.0f} MB opening, {folding / 1e6:.0f} MB folding a {model_bytes / 1e6:.0f} MB "
          f"model (largest tensor {largest / 1e6:.1f} MB)")
    assert folding - baseline < 0.4 * model_bytes, f"fold added {(folding - baseline) / 1e6:.0f} MB"


def load_file_keys(folder: str) -> set:
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


def test_readme_fold_snippets(tmp_path, monkeypatch):
    """The LoRA page's fold commands and notebook snippet run as written, against the demo models."""
    import re
    import shlex

    from click.testing import CliRunner

    from mergekit_lite.cli import cli
    from mergekit_lite.spec.schema import load_spec
    from mergekit_lite.strategies.registry import all_strategies
    from mergekit_lite.testing.adapters import write_demo_adapters
    from mergekit_lite.testing.synthetic import write_demo_models

    small = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=128)
    write_demo_models(str(tmp_path / "demo" / "models"), small, max_shard_size=40_000)
    write_demo_adapters(str(tmp_path / "demo" / "adapters"), small)
    monkeypatch.chdir(tmp_path)
    section = (REPO / "docs" / "lora.md").read_text()
    bash, yaml_text, python = (re.findall(rf"```{kind}\n(.*?)```", section, re.S)[0]
                               for kind in ("bash", "yaml", "python"))
    commands = [c for c in bash.replace("\\\n", " ").splitlines() if "org/" not in c]
    assert len(commands) == 2
    for command in commands:
        words = shlex.split(command.split("#")[0])
        assert words[:2] == ["merge", "fold"]
        result = CliRunner().invoke(cli, words[1:] + ["--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    spec = load_spec(yaml_text)
    assert spec.models[1].ref.adapters[0].weight == 0.8
    if spec.merge_method in all_strategies():
        run_merge(spec, tmp_path / "ties", progress=False)
    exec(compile(python, "docs/lora.md", "exec"), {})
    assert (tmp_path / "demo" / "folded" / "model.safetensors").exists()


def test_base_identity_rules(tmp_path):
    """identity.check_base: Hub ids must match; local paths pass by folder or last name, else a warning."""
    from mergekit_lite.errors import ModelError
    from mergekit_lite.lora.identity import check_base

    cache = tmp_path / "hub" / "models--meta-llama--Llama-3-8B" / "snapshots" / "abc"
    cache.mkdir(parents=True)
    local = tmp_path / "Llama-3-8B"
    local.mkdir()
    assert check_base(None, None, ModelPath("org/x"), str(local), "a") is None
    assert check_base("meta-llama/Llama-3-8B", None, ModelPath(str(cache)), str(cache), "a") is None
    assert check_base("meta-llama/llama-3-8b", None, ModelPath("meta-llama/Llama-3-8B"), str(cache), "a") is None
    with pytest.raises(ModelError, match="made for 'meta-llama/Llama-3-8B-Instruct', but the base is"):
        check_base("meta-llama/Llama-3-8B-Instruct", None, ModelPath(str(cache)), str(cache), "a")
    assert check_base("meta-llama/Llama-3-8B", None, ModelPath(str(local)), str(local), "a") is None  # same name
    assert check_base(str(local), None, ModelPath(str(local)), str(local), "a") is None             # same folder
    assert check_base("/train/box/base", None, ModelPath(str(local)), str(local), "a").startswith(
        "a: the adapter names '/train/box/base' as its base")
    assert check_base("org/Llama-3-8B", "v1", ModelPath("org/Llama-3-8B", "v2"), str(cache), "a") == (
        "a: the adapter was trained on revision 'v1' of its base, the base given is revision 'v2'")
