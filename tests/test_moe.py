"""`merge moe` against mergekit-moe 0.1.5 on the same YAML, and a closed form.

Tiny Llama and Qwen2 checkpoints (2 layers, hidden 32) with a tiny BPE tokenizer built in code. Checked:
expert and base tensors bit-identical to mergekit-moe's; routers of gate_mode hidden / cheap_embed equal to
within float32 rounding (both compute the same formulas; hidden in bfloat16 as mergekit); random routers
equal to mergekit-moe's with --random-seed (torch.manual_seed) and reproducible; outputs load in transformers
with finite logits; a MoE whose experts are all one model computes that model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mergekit_lite.testing.synthetic import LlamaShape, write_model
from tests.helpers.models import read_folder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("mergekit")

SHAPE = dict(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)


def make_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"_tok_{i}": i for i in range(3, 64)},
             **{c: 64 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_models")
    for name, seed in (("base", 0), ("code", 1), ("chat", 2), ("math", 3)):
        write_model(str(root / name), LlamaShape(vocab=96, **SHAPE), seed=seed, tokenizer=False,
                    max_shard_size=20_000)
        make_tokenizer().save_pretrained(str(root / name))
        config = json.loads((root / name / "config.json").read_text())
        config.update(bos_token_id=1, eos_token_id=2)
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def qwen3_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_models")
    config = transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, vocab_size=96, bos_token_id=1, eos_token_id=2)
    for name, seed in (("base", 0), ("code", 1), ("chat", 2)):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(root / name), max_shard_size="20KB")
        make_tokenizer().save_pretrained(str(root / name))
    return root


def moe_yaml(models, gate: str = "cheap_embed", extra: str = "", experts=("code", "chat"), shared: str = "") -> str:
    prompts = {"code": ["write code", "fix this bug"], "chat": ["hello there"], "math": ["add two numbers"],
               "base": ["just text"]}
    lines = [f"base_model: {models / 'base'}", f"gate_mode: {gate}", "experts:"]
    for i, name in enumerate(experts):
        lines += [f"  - source_model: {models / name}", f"    positive_prompts: {json.dumps(prompts[name])}"]
        if i == 0:
            lines.append('    negative_prompts: ["hello there"]')
    return "\n".join(lines) + "\n" + shared + extra


def run_mergekit_moe(text: str, out, seed: int | None = None, allow_all_same: bool = False):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    if seed is not None:
        torch.manual_seed(seed)
    build(MoEMergeConfig.model_validate(yaml.safe_load(text)), str(out), MergeOptions(quiet=True), device="cpu",
          allow_all_same=allow_all_same)
    return out


def ours(cli, tmp_path, text: str, *extra: str, name: str = "ours"):
    spec = tmp_path / f"{name}.yml"
    spec.write_text(text)
    result = cli("moe", spec, tmp_path / name, "--max-shard-size", "1MB", "--device", "cpu", "-q", *extra)
    assert result.exit_code == 0, result.stderr
    return tmp_path / name


def compare(a_dir, b_dir) -> dict:
    """Every tensor bit-identical, routers included (same formulas, same order of float operations)."""
    a, b = read_folder(a_dir), read_folder(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    return a


def logits(folder, ids=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = ids if ids is not None else torch.tensor([[1, 70, 71, 5, 9, 80, 81]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("gate", ["cheap_embed", "hidden"])
def test_mixtral_matches_mergekit(cli, tmp_path, models, gate):
    text = moe_yaml(models, gate, experts=("code", "chat", "math"))
    mine = ours(cli, tmp_path, text)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    compare(mine, theirs)
    config, their_config = (json.loads((p / "config.json").read_text()) for p in (mine, theirs))
    for key in ("model_type", "architectures", "num_local_experts", "num_experts_per_tok", "sliding_window"):
        assert config[key] == their_config[key], key
    assert config["num_local_experts"] == 3
    out = logits(mine)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(theirs))


def test_qwen2_moe_matches_mergekit(cli, tmp_path, models):
    # mergekit-moe opens only the base and the routed experts, so its shared expert must be one of them
    shared = f"shared_experts:\n  - source_model: {models / 'base'}\n    positive_prompts: [\"add two numbers\"]\n" \
             "    residual_scale: 0.5\n"
    text = moe_yaml(models, "cheap_embed", shared=shared, extra="architecture: qwen\n")
    mine = ours(cli, tmp_path, text)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    compare(mine, theirs)
    config, their_config = (json.loads((p / "config.json").read_text()) for p in (mine, theirs))
    for key in ("model_type", "num_experts", "num_experts_per_tok", "shared_expert_intermediate_size",
                "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step"):
        assert config[key] == their_config[key], key
    out = logits(mine)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(theirs))


def test_qwen3_moe_matches_mergekit(cli, tmp_path, qwen3_models):
    text = moe_yaml(qwen3_models, "hidden", extra="experts_per_token: 1\n")
    mine = ours(cli, tmp_path, text)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit")
    compare(mine, theirs)
    config = json.loads((mine / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == ("qwen3_moe", 2, 1)
    out = logits(mine)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(theirs))


def test_hidden_routers_run_the_base_layer_by_layer(cli, tmp_path, models, monkeypatch):
    """gate_mode hidden runs the base in bfloat16 with its weights read one module at a time (never loaded whole),
    and its routers still equal mergekit-moe's, which loads the base whole."""
    from mergekit_lite.api import moe as api_moe
    from mergekit_lite.engine import router
    from mergekit_lite.sources.opener import open_checkpoint

    def whole(folder, device):
        raise AssertionError("the base was loaded whole")

    streamed = []
    original = api_moe._streamed_base
    monkeypatch.setattr(router, "_whole_model", whole)
    monkeypatch.setattr(api_moe, "_streamed_base", lambda folder, device: streamed.append(original(folder, device))
                        or streamed[-1])
    text = moe_yaml(models, "hidden", experts=("code", "chat", "math"))
    mine = ours(cli, tmp_path, text)
    compare(mine, run_mergekit_moe(text, tmp_path / "mergekit"))
    (model,) = streamed
    base = open_checkpoint(str(models / "base"))
    base.close()
    # bfloat16 on disk and while it runs: at most a layer's weights and the next layer's (read ahead) at once
    layer = sum(info.nbytes for name, info in base.tensors.items() if ".layers.0." in name)
    largest = max(info.nbytes for info in base.tensors.values())
    assert model.streaming.live == 0 and 0 < model.streaming.peak <= 2 * max(layer, largest)
    assert model.streaming.peak < sum(info.nbytes for info in base.tensors.values()) / 2
    passes = 3 + 1   # each expert's positive prompts, and the first expert's negative ones (moe_yaml)
    assert model.streaming.reads >= passes * len(base.tensors)   # every tensor in every pass


def test_experts_stream_in_row_blocks(cli, tmp_path, models, monkeypatch):
    """With pieces of one expert, the fused tensors are read a block of experts at a time: same bytes."""
    from mergekit_lite.engine import loop
    from mergekit_lite.plan.moe import StackedSource

    text = moe_yaml(models, "random", experts=("code", "chat", "math"))
    whole = ours(cli, tmp_path, text, name="whole")
    reads = []
    original = StackedSource.read
    monkeypatch.setattr(StackedSource, "read", lambda self, rows=None: reads.append(rows) or original(self, rows))
    monkeypatch.setattr(loop, "PIECE_ELEMENTS", 2 * 48 * 32)
    blocks = ours(cli, tmp_path, text, name="blocks")
    assert (0, 1) in reads and (2, 3) in reads and None not in reads
    compare(whole, blocks)


def test_dry_run_writes_nothing(cli, tmp_path, models):
    spec = tmp_path / "moe.yml"
    spec.write_text(moe_yaml(models, "hidden"))
    result = cli("moe", spec, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "mixtral MoE of 2 experts, 2 layers" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gate", ["random", "uniform_random"])
def test_random_routers_follow_the_seed(cli, tmp_path, models, gate):
    text = moe_yaml(models, gate)
    first = ours(cli, tmp_path, text, "--seed", "7", name="a")
    second = ours(cli, tmp_path, text, "--seed", "7", name="b")
    other = ours(cli, tmp_path, text, "--seed", "8", name="c")
    a, b, c = (read_folder(p)["model.layers.1.mlp.gate.weight"] for p in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    theirs = run_mergekit_moe(text, tmp_path / "mergekit", seed=7)   # mergekit-moe --random-seed 7
    compare(first, theirs)


def test_same_expert_everywhere_computes_that_model(cli, tmp_path, models):
    text = moe_yaml(models, "random", experts=("code", "code", "code"))
    (tmp_path / "x.yml").write_text(text)
    result = cli("moe", tmp_path / "x.yml", tmp_path / "refused", "-q")
    assert result.exit_code == 2 and "every expert is the same model" in result.stderr
    mine = ours(cli, tmp_path, text, "--i-understand-this-is-not-useful-without-training")
    # Routing weights are renormalized over the chosen experts and sum to 1: each layer computes MLP_code.
    # Attention and norms are the base model's, so compare with the base model whose MLPs are code's.
    expected = tmp_path / "expected"
    expected.mkdir()
    for f in (models / "base").iterdir():
        (expected / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted((models / "base").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    code = {}
    for f in sorted((models / "code").glob("*.safetensors")):
        code.update(load_file(str(f)))
    tensors.update({k: v for k, v in code.items() if ".mlp." in k})
    for f in expected.glob("*.safetensors*"):
        f.unlink()
    (expected / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(expected / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(logits(mine), logits(expected), rtol=1e-5, atol=1e-5)


def test_plain_merge_spec_is_sent_to_merge_run(cli, tmp_path, models):
    spec = tmp_path / "plain.yml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {models / 'base'}\n")
    result = cli("moe", spec, tmp_path / "out")
    assert result.exit_code == 2
    assert f"merge run {spec} OUT" in result.stderr


def test_validate_passes_a_moe(cli, tmp_path, models):
    mine = ours(cli, tmp_path, moe_yaml(models, "cheap_embed"), "--no-validate")
    result = cli("validate", mine, "--device", "cpu")
    assert "FAIL" not in result.stdout, result.stdout
    # nothing is merged in a MoE, so nothing to recompute: not applicable, and a correct MoE PASSES
    assert "recompute  not applicable  a mixture of experts (merge moe)" in result.stdout, result.stdout
    assert result.exit_code == 0 and "PASSED" in result.stdout, result.stdout + result.stderr


def test_noise_scale_is_seeded(cli, tmp_path, models):
    """noise_scale adds N(0, noise_scale^2) from our generator (mergekit draws from torch's global one): the same
    seed gives the same bytes; the noise has the asked scale."""
    text = moe_yaml(models, "random").replace('    negative_prompts: ["hello there"]\n',
                                               '    negative_prompts: ["hello there"]\n    noise_scale: 0.01\n')
    first, second = (ours(cli, tmp_path, text, "--seed", "3", name=n) for n in ("a", "b"))
    compare(first, second)
    fused = read_folder(first)["model.layers.0.mlp.experts.down_proj"]
    clean = read_folder(models / "code")["model.layers.0.mlp.down_proj.weight"]
    noise = fused[0] - clean
    assert 0.008 < noise.std().item() < 0.012
    assert torch.equal(fused[1], read_folder(models / "chat")["model.layers.0.mlp.down_proj.weight"])
