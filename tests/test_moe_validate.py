"""`merge validate` on a MoE: where its spec proves it computes what a dense model computes, the forward check
compares their logits (validation/moe_forward.py); elsewhere the base model's loss sits beside the MoE's.

Independent references: the dense model "base with code's MLPs" built here by hand (the base's tensors with code's
MLP tensors, saved as a plain folder, as test_moe.py does) and run as a plain model folder; a MoE whose one
expert's MLP tensor is rewritten in its safetensors file; the base model's own loss run as a plain folder.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from mergekit_lite.spec.moe import parse_moe
from mergekit_lite.validation import validate
from mergekit_lite.validation.folder import read_output
from mergekit_lite.validation.moe_forward import dense_twin
from tests.test_moe import models, moe_yaml, qwen3_models  # noqa: F401  (the module's fixtures)

pytest.importorskip("transformers")

SAME = "--i-understand-this-is-not-useful-without-training"


def forward_of(report):
    return next(check for check in report.checks if check.name == "forward")


@pytest.fixture(scope="module")
def same_experts(tmp_path_factory, models):  # noqa: F811
    """A Mixtral MoE whose two experts are both `code` (random routers): it must compute base-with-code's-MLPs."""
    from mergekit_lite.api.moe import run_moe

    root = tmp_path_factory.mktemp("moe_same")
    text = moe_yaml(models, "random", experts=("code", "code"))
    run_moe(text, root / "moe", allow_all_same=True, device="cpu", progress=False, validate=False)
    return root / "moe"


def dense_by_hand(models, out):  # noqa: F811
    """The base model's folder with code's gate/up/down_proj tensors in place of its own, one safetensors file."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in (models / "base").iterdir():
        if not f.name.startswith("model"):   # config, tokenizer: the base's
            shutil.copy(f, out / f.name)
    tensors = {}
    for f in sorted((models / "base").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in sorted((models / "code").glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(str(f)).items() if ".mlp." in k})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_identical_experts_equal_the_dense_model(tmp_path, models, same_experts):  # noqa: F811
    report = validate(same_experts, device="cpu")
    forward = forward_of(report)
    assert report.status == "passed" and forward.status == "passed", str(report)
    label = f"{models / 'base'} with {models / 'code'}'s MLPs"
    assert forward.numbers["compared_with"] == label
    assert f"same as {label}: max |logit diff|" in forward.summary
    assert forward.numbers["max_logit_diff"] <= forward.numbers["logit_tolerance"]
    assert forward.numbers["max_logit_diff"] < 1e-4     # float32 MoE: only the order of the sum differs
    # the reference (base streamed with code's MLPs swapped in) is the hand-built dense folder
    hand = forward_of(validate(dense_by_hand(models, tmp_path / "dense"), device="cpu"))
    assert forward.numbers["inputs"][0]["model"] == label
    assert forward.numbers["inputs"][0]["loss"] == pytest.approx(hand.numbers["merged_loss"], abs=1e-5)
    assert forward.numbers["merged_loss"] == pytest.approx(hand.numbers["merged_loss"], abs=1e-4)


def test_a_corrupted_expert_fails_the_comparison(tmp_path, same_experts):
    broken = tmp_path / "broken"
    shutil.copytree(same_experts, broken)
    info = read_output(str(broken)).tensors["model.layers.0.mlp.experts.down_proj"]   # (2, 32, 48)
    per_expert = info.numel // info.shape[0]
    values = torch.full((info.shape[2],), 0.5, dtype=info.dtype).view(torch.uint8).numpy().tobytes()
    with open(info.path, "r+b") as f:          # expert 1's first row: finite values, another expert now
        f.seek(info.start + per_expert * info.nbytes // info.numel)
        f.write(values)
    report = validate(broken, device="cpu")
    forward = forward_of(report)
    assert report.status == "failed" and forward.status == "failed", str(report)
    assert [c.status for c in report.checks[:2]] == ["passed", "passed"]   # structure and finite see nothing
    text = str(forward.failures[0])
    assert text.startswith("logits differ from ") and "'s MLPs's by up to" in text, text
    assert "so the MoE must compute what that dense model computes" in text
    assert forward.numbers["max_logit_diff"] > 10 * forward.numbers["logit_tolerance"]


def test_distinct_experts_give_context_only(tmp_path, models):  # noqa: F811
    from mergekit_lite.api.moe import run_moe

    result = run_moe(moe_yaml(models, "cheap_embed"), tmp_path / "moe", device="cpu", progress=False)
    after = forward_of(result.validation)      # after `merge moe`: the base is not run
    assert after.status == "passed" and after.numbers["compared_with"] is None
    assert after.numbers["inputs"][0]["loss"] is None
    assert after.numbers["inputs"][0]["note"].startswith("not run: the MoE need not compute what a dense model "
                                                         "computes (its experts are different models)")
    forward = forward_of(validate(tmp_path / "moe", device="cpu"))
    assert forward.status == "passed" and forward.numbers["compared_with"] is None
    entry = forward.numbers["inputs"][0]
    assert entry["model"] == str(models / "base") and entry["note"].startswith("context only")
    base = forward_of(validate(models / "base", device="cpu"))     # the base as a plain folder
    assert entry["loss"] == pytest.approx(base.numbers["merged_loss"], abs=1e-6)
    assert f"{models / 'base'} {entry['loss']:.4f}" in forward.summary


def test_expert_that_is_the_base_is_run_itself(tmp_path, models):  # noqa: F811
    from mergekit_lite.api.moe import run_moe

    text = moe_yaml(models, "random", experts=("base",)) + "experts_per_token: 1\n"
    result = run_moe(text, tmp_path / "moe", device="cpu", progress=False)
    forward = forward_of(result.validation)
    assert forward.status == "passed" and forward.numbers["compared_with"] == str(models / "base")
    assert forward.numbers["max_logit_diff"] < 1e-4


def test_qwen3_moe_of_one_expert_model(tmp_path, qwen3_models):  # noqa: F811
    """Qwen3-MoE renormalises the chosen experts' weights (norm_topk_prob, as merge moe writes): compared too."""
    from mergekit_lite.api.moe import run_moe

    text = moe_yaml(qwen3_models, "random", experts=("chat", "chat")) + "experts_per_token: 1\n"
    run_moe(text, tmp_path / "moe", allow_all_same=True, device="cpu", progress=False, validate=False)
    forward = forward_of(validate(tmp_path / "moe", device="cpu"))
    assert forward.status == "passed", forward.summary
    assert forward.numbers["compared_with"] == f"{qwen3_models / 'base'} with {qwen3_models / 'chat'}'s MLPs"
    assert forward.numbers["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("extra, config, why", [
    ('shared_experts:\n  - source_model: {code}\n    positive_prompts: ["x"]\n', {"model_type": "qwen2_moe"},
     "a shared expert adds its output"),
    ("", {"model_type": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 1, "norm_topk_prob": False},
     "norm_topk_prob is false"),
    ("", {"model_type": "mixtral", "num_local_experts": 3, "num_experts_per_tok": 2}, "config.json has 3 experts"),
])
def test_what_is_not_provable(models, extra, config, why):  # noqa: F811
    import yaml

    text = moe_yaml(models, "random", experts=("code", "code")) + extra.format(code=models / "code")
    twin, reason = dense_twin(parse_moe(yaml.safe_load(text)), config, 16)
    assert twin is None and reason.startswith(why), reason


def test_noise_is_not_provable(models):  # noqa: F811
    import yaml

    text = moe_yaml(models, "random", experts=("code", "code")).replace(
        '    negative_prompts: ["hello there"]\n', '    negative_prompts: ["hello there"]\n    noise_scale: 0.01\n')
    twin, reason = dense_twin(parse_moe(yaml.safe_load(text)), {"model_type": "mixtral"}, 16)
    assert twin is None and reason == "noise_scale or residual_scale changes the experts"


def test_qwen2_moe_output_streams(tmp_path, models):  # noqa: F811
    """The Qwen2-MoE output stores one tensor per expert, which transformers 5 stacks while loading: the forward
    check runs it layer by layer all the same (each layer's stack built when it runs), with the logits of
    transformers' whole-model loading, and passes."""
    from mergekit_lite.api.moe import run_moe
    from mergekit_lite.validation.inference import _config_of, load_model, logits_of, make_batch
    from mergekit_lite.validation.streamed import open_model

    shared = f"shared_experts:\n  - source_model: {models / 'base'}\n    positive_prompts: [\"add two numbers\"]\n"
    result = run_moe(moe_yaml(models, "cheap_embed", shared=shared, extra="architecture: qwen\n"), tmp_path / "moe",
                     device="cpu", progress=False)
    assert forward_of(result.validation).status == "passed", forward_of(result.validation).summary
    folder = str(tmp_path / "moe")
    assert _config_of(folder)["model_type"] == "qwen2_moe"
    cpu = torch.device("cpu")
    batch = make_batch(folder, _config_of(folder)["vocab_size"])
    model = open_model(folder, cpu, whole_limit=1 << 30)
    assert hasattr(model, "streaming"), "loaded whole, not streamed"
    assert torch.equal(logits_of(model, batch, cpu), logits_of(load_model(folder, cpu), batch, cpu))
