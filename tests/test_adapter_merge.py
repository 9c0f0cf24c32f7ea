"""`merge adapters` / merge_adapters against peft's own LoraModel.add_weighted_adapter.

Adapters are made by peft on a tiny Llama (random A and B, so B != 0); peft's reference is
add_weighted_adapter on a PeftModel holding them, read back with get_peft_model_state_dict. Per module we
compare the delta scaling * B @ A (the only thing the svd factors determine: their signs are arbitrary) and,
for cat and the factor methods, the factors themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from helpers.lora_oracle import llama, make_adapter  # noqa: E402

from mergekit_lite.api.adapters import merge_adapters  # noqa: E402
from mergekit_lite.errors import ModelError, UsageError  # noqa: E402
from mergekit_lite.lora.combination import module_seed  # noqa: E402

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    model = llama()
    return {
        "model": model,
        "a": make_adapter(model, root / "a", seed=1, r=8, lora_alpha=16, target_modules=QV),
        "b": make_adapter(model, root / "b", seed=2, r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
        "c4": make_adapter(model, root / "c4", seed=3, r=4, lora_alpha=16, target_modules=QV),
        "rs": make_adapter(model, root / "rs", seed=4, r=8, lora_alpha=8, use_rslora=True, target_modules=QV),
    }


def peft_combined(made: dict, names: list[str], weights: list[float], seed=None, **kwargs) -> tuple[dict, dict]:
    """peft's new adapter: {key: tensor} as save_pretrained writes it, and its config.

    ``seed``: before peft combines each module, its global RNG is seeded with our seed of that module
    (module_seed), so peft's DARE masks are drawn from the stream ours are drawn from."""
    import copy

    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora.model import LoraModel

    model = PeftModel.from_pretrained(copy.deepcopy(made["model"]), made[names[0]], adapter_name="s0")
    for i, name in enumerate(names[1:], 1):
        model.load_adapter(made[name], adapter_name=f"s{i}")
    module_names = {id(m): n for n, m in model.base_model.model.named_modules()}
    patched = {}
    if seed is not None:
        for method in ("_generalized_task_arithmetic_weighted_adapter",
                       "_svd_generalized_task_arithmetic_weighted_adapter"):
            original = getattr(LoraModel, method)

            def seeded(self, *args, _original=original, **kw):
                target = next(a for a in args if id(a) in module_names)
                torch.manual_seed(module_seed(seed, module_names[id(target)]))
                return _original(self, *args, **kw)
            patched[method] = original
            setattr(LoraModel, method, seeded)
    try:
        model.add_weighted_adapter([f"s{i}" for i in range(len(names))], weights, "new", **kwargs)
    finally:
        for method, original in patched.items():
            setattr(LoraModel, method, original)
    return get_peft_model_state_dict(model, adapter_name="new"), model.peft_config["new"].to_dict()


def deltas(tensors: dict, scaling: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, down in tensors.items():
        if key.endswith("lora_A.weight"):
            out[key[: -len(".lora_A.weight")]] = scaling * (tensors[key.replace("lora_A", "lora_B")] @ down)
    return out


def peft_scaling(config: dict) -> float:
    return config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])


def assert_deltas(ours, peft_tensors: dict, peft_config: dict, rtol: float = 1e-5) -> int:
    got = deltas(ours.tensors, ours.config["lora_alpha"] / ours.config["r"])
    expected = deltas(peft_tensors, peft_scaling(peft_config))
    assert got.keys() == expected.keys()
    for module, delta in expected.items():
        scale = delta.abs().max().item()
        diff = (got[module] - delta).abs().max().item()
        assert diff <= rtol * scale + 1e-7, f"{module}: max |diff| {diff:.3g} of max {scale:.3g}"
    return len(expected)


def test_cat_and_linear_equal_peft_factor_for_factor(made):
    for method in ("cat", "linear"):
        names = ["a", "b"] if method == "cat" else ["a", "rs"]
        peft_tensors, config = peft_combined(made, names, [0.7, -0.4], combination_type=method)
        ours = merge_adapters([made[n] for n in names], combination_type=method, weights=[0.7, -0.4])
        assert ours.tensors.keys() == peft_tensors.keys()
        for key, tensor in peft_tensors.items():
            assert torch.equal(ours.tensors[key], tensor), key
        assert ours.config["r"] == config["r"] and ours.config["lora_alpha"] == config["lora_alpha"]
        if method == "cat":   # cat is exact: the new delta is the weighted sum of the sources' deltas
            assert sorted(ours.config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("method,kwargs", [
    ("svd", {}), ("svd", {"svd_rank": 4, "svd_clamp": 0.9}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}), ("ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.6, "svd_rank": 6}),
])
def test_deterministic_methods_equal_peft(made, method, kwargs):
    peft_tensors, config = peft_combined(made, ["a", "b"], [0.6, 0.9], combination_type=method, **kwargs)
    ours = merge_adapters([made["a"], made["b"]], combination_type=method, weights=[0.6, 0.9], **kwargs)
    assert assert_deltas(ours, peft_tensors, config) == 6   # q and v of a, q and o of b, two layers
    if not method.endswith("svd"):
        for key, tensor in peft_tensors.items():
            assert torch.equal(ours.tensors[key], tensor), key


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_equals_peft_with_the_module_seed(made, method):
    """peft draws every mask from its global RNG, after the new adapter's random init, in model order; we
    draw each module's masks from a generator seeded with module_seed(seed, module), in peft's order inside
    the module (A factors, then B factors; or each delta). Seeding peft's RNG the same way per module gives
    the same masks, so the same adapter."""
    peft_tensors, config = peft_combined(made, ["a", "b"], [1.0, 0.5], seed=7, combination_type=method,
                                         density=0.4)
    ours = merge_adapters([made["a"], made["b"]], combination_type=method, weights=[1.0, 0.5], density=0.4, seed=7)
    assert assert_deltas(ours, peft_tensors, config) == 6
    if not method.endswith("svd"):
        for key, tensor in peft_tensors.items():
            assert torch.equal(ours.tensors[key], tensor), key
    other = merge_adapters([made["a"], made["b"]], combination_type=method, weights=[1.0, 0.5], density=0.4, seed=8)
    assert not all(torch.equal(other.tensors[k], t) for k, t in ours.tensors.items())


def test_dare_statistics_on_many_modules(made):
    """With several modules the draws differ from peft's (its one global stream runs in model order), so
    compare statistics: the kept fraction of A entries is the density, and the rescale keeps the mean."""
    ours = merge_adapters([made["a"], made["a"]], combination_type="dare_linear", weights=[1.0, 0.0], density=0.5)
    for key, tensor in ours.tensors.items():
        if key.endswith("lora_A.weight"):
            kept = (tensor != 0).float().mean().item()
            assert 0.4 < kept < 0.6, (key, kept)


def test_rslora_sources_peft_scaling_bug_fixed(made):
    """peft before 0.22 keeps use_rslora of the first adapter, so its new adapter applies sqrt(r) * B @ A
    instead of B @ A (huggingface/peft#3449); from 0.22 it writes use_rslora false, as we do. Either way our
    delta is peft's factors' product."""
    import peft
    from packaging.version import Version

    peft_tensors, config = peft_combined(made, ["rs", "a"], [1.0, 1.0], combination_type="cat")
    assert config["use_rslora"] is (Version(peft.__version__) < Version("0.22"))
    ours = merge_adapters([made["rs"], made["a"]], combination_type="cat")
    assert ours.config["use_rslora"] is False
    assert_deltas(ours, peft_tensors, {**config, "use_rslora": False})


def test_different_ranks(made):
    with pytest.raises(ModelError, match="all adapters need the same rank .* r=8, .* r=4"):
        merge_adapters([made["a"], made["c4"]], combination_type="linear")
    for method in ("cat", "svd"):
        peft_tensors, config = peft_combined(made, ["a", "c4"], [1.0, 1.0], combination_type=method)
        ours = merge_adapters([made["a"], made["c4"]], combination_type=method)
        assert ours.config["r"] == config["r"] == (12 if method == "cat" else 8)
        assert_deltas(ours, peft_tensors, config)


def test_written_folder_loads_in_peft_and_folds(made, tmp_path, cli):
    from peft import PeftModel

    out = tmp_path / "combined"
    result = cli("adapters", made["a"], made["b"], "-o", out, "--method", "cat", "--weights", "0.5,0.5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "adapter_record.json", "merge_run.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16
    import copy
    model = PeftModel.from_pretrained(copy.deepcopy(made["model"]), out)
    reference = PeftModel.from_pretrained(copy.deepcopy(made["model"]), made["a"], adapter_name="a")
    reference.load_adapter(made["b"], adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.5, 0.5], "new", combination_type="cat")
    reference.set_adapter("new")
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-5)
    again = cli("adapters", made["a"], made["b"], "-o", out, "--method", "cat")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert cli("adapters", made["a"], made["b"], "-o", out, "--method", "svd", "--overwrite").exit_code == 0


def test_parameter_errors(made, tmp_path: Path):
    a, b = made["a"], made["b"]
    with pytest.raises(UsageError, match="unknown combination type 'tie'. Did you mean 'ties'"):
        merge_adapters([a, b], combination_type="tie")
    with pytest.raises(UsageError, match="density 1.5 is outside"):
        merge_adapters([a, b], combination_type="ties", density=1.5)
    with pytest.raises(UsageError, match="ties needs a density"):
        merge_adapters([a, b], combination_type="ties")
    with pytest.raises(UsageError, match="cat does not prune"):
        merge_adapters([a, b], combination_type="cat", density=0.5)
    with pytest.raises(UsageError, match="3 weight"):
        merge_adapters([a, b], combination_type="cat", weights=[1, 2, 3])
    with pytest.raises(ModelError, match="svd_rank 100 is larger"):
        merge_adapters([a, b], combination_type="svd", svd_rank=100)


def test_spec_with_adapter_output(made, tmp_path, cli):
    """output: adapter maps task_arithmetic onto cat (weights lambda * w_i, exact) and ties onto ties_svd."""
    from safetensors.torch import load_file

    a, b = made["a"], made["b"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: task_arithmetic\noutput: adapter\nparameters: {{lambda: 0.5}}\nmodels:\n"
                    f"  - model: org/base+{a}\n    parameters: {{weight: 1.0}}\n"
                    f"  - model: org/base+{b}\n    parameters: {{weight: 0.6}}\n")
    result = cli("run", spec, "-o", tmp_path / "ta", "--quiet")
    assert result.exit_code == 0, result.output
    peft_tensors, _ = peft_combined(made, ["a", "b"], [0.5, 0.3], combination_type="cat")
    written = load_file(tmp_path / "ta" / "adapter_model.safetensors")
    assert written.keys() == peft_tensors.keys()
    assert all(torch.allclose(written[k], t, rtol=1e-6, atol=0) for k, t in peft_tensors.items())
    assert (tmp_path / "ta" / "mergekit_config.yml").read_text() == spec.read_text()

    spec.write_text(f"merge_method: ties\noutput: adapter\nparameters: {{density: 0.5}}\nmodels:\n"
                    f"  - model: org/base+{a}\n  - model: org/base+{b}\n")
    assert cli("run", spec, "-o", tmp_path / "ties", "--quiet").exit_code == 0
    peft_tensors, config = peft_combined(made, ["a", "b"], [1.0, 1.0], combination_type="ties_svd", density=0.5)
    ours = type("R", (), {"tensors": load_file(tmp_path / "ties" / "adapter_model.safetensors"),
                          "config": json.loads((tmp_path / "ties" / "adapter_config.json").read_text())})
    assert assert_deltas(ours, peft_tensors, config) == 6

    spec.write_text(f"merge_method: slerp\noutput: adapter\nparameters: {{t: 0.5}}\nmodels:\n"
                    f"  - model: org/base+{a}\n  - model: org/base+{b}\n")
    refused = cli("run", spec, "-o", tmp_path / "slerp", "--quiet")
    assert refused.exit_code == 2
    assert refused.output == (f"error: {spec}: merge_method: slerp cannot make an adapter: it interpolates whole "
                              "weights on a sphere, which is not a function of the adapters' changes\nHint: use "
                              "linear, task_arithmetic, ties, dare_ties or dare_linear (or a combination type: cat, "
                              "linear, ties, dare_linear, dare_ties, magnitude_prune, svd, ties_svd, dare_linear_svd, "
                              "dare_ties_svd, magnitude_prune_svd), or output: model\n")
    spec.write_text(f"merge_method: linear\noutput: adapter\nmodels:\n  - model: org/base+{a}\n  - model: {a}\n")
    mixed = cli("run", spec, "-o", tmp_path / "mixed", "--quiet")
    assert mixed.exit_code == 2 and "is not one base+adapter" in mixed.output
