"""Inputs that used to end in an internal error, or in a silent choice, now end in a merge or a clear error
before any tensor is read: float8 weights (every float8 dtype, every strategy path, NaN checks, LoRA folds),
zero-size tensors, null references, size and device options, every Hub failure, inputs whose configs disagree.
The CLI cases with one exact message are in tests/helpers/hostile/internal.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.hostile.catalogue import TINY
from helpers.hubcli import TOKEN
from helpers.models import edit_config, read_folder, write_spec
from safetensors.torch import load_file, save_file

from mergekit_lite import run_merge
from mergekit_lite.dtypes import FLOAT8, dtype_name
from mergekit_lite.errors import HubError, ModelError, SpecError, UsageError
from mergekit_lite.testing.synthetic import write_model

MODEL_FILE = "model.safetensors"
EMBED = "model.embed_tokens.weight"
E4M3 = torch.float8_e4m3fn


def _convert(source: Path, dest: Path, dtype: torch.dtype) -> Path:
    shutil.copytree(source, dest)
    save_file({k: v.to(dtype) for k, v in load_file(str(source / MODEL_FILE)).items()}, str(dest / MODEL_FILE))
    return dest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """base and two fine-tunes (float32), each also as float8 (every dtype), and the float8 values in float32."""
    root = tmp_path_factory.mktemp("internal")
    for name, delta in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), TINY, seed=0, delta_seed=delta, delta_scale=0.05)
        for dtype in FLOAT8:
            stored = _convert(root / name, root / f"{name}-{dtype_name(dtype)}", dtype)
            _convert(stored, root / f"{name}-{dtype_name(dtype)}-f32", torch.float32)   # exact: every float8 value fits
    return root


def merged(tmp_path: Path, text: str, name: str, **settings) -> dict[str, torch.Tensor]:
    spec = write_spec(tmp_path / f"{name}.yaml", text)
    run_merge(str(spec), tmp_path / name, progress=False, validate=False, **settings)
    return read_folder(tmp_path / name)


# ------------------------------------------------------------------------------------------------ float8

METHODS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.3}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                       "    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.5}}\nmodels:\n  - model: {a}\n"
            "    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nparameters: {{density: 0.5}}\nmodels:\n  - model: {a}\n"
                 "    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "della": "merge_method: della\nbase_model: {base}\nparameters: {{density: 0.5}}\nmodels:\n  - model: {a}\n"
             "    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nparameters: {{density: 0.8}}\nmodels:\n"
                   "  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\nmodels:\n  - model: {a}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n"
               "  - model: {b}\n    parameters: {{weight: 0.6}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "concat": "merge_method: concat\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "stacking": "merge_method: passthrough\nslices:\n  - sources:\n    - model: {a}\n      layer_range: [0, 2]\n"
                "  - sources:\n    - model: {b}\n      layer_range: [1, 2]\n",
}


def _names(tiny: Path, dtype: torch.dtype, suffix: str = "") -> dict[str, Path]:
    return {key: tiny / f"{name}-{dtype_name(dtype)}{suffix}" for key, name in (("base", "base"), ("a", "ft-a"), ("b", "ft-b"))}


CASES = [(method, E4M3) for method in METHODS] + [(m, d) for d in sorted(FLOAT8, key=str) if d != E4M3
                                                  for m in ("linear", "ties")]


@pytest.mark.parametrize("method, dtype", CASES, ids=[f"{m}-{str(d)[6:]}" for m, d in CASES])
def test_float8_inputs_merge_as_their_float32_values(tiny, tmp_path, method, dtype):
    """Every strategy path (element-wise blocks, chunked whole tensors, whole tensors, layouts) upcasts float8
    to float32: the output is exactly the merge of the same values stored in float32."""
    text = METHODS[method]
    got = merged(tmp_path, text.format(**_names(tiny, dtype)), "fp8", out_dtype="bfloat16")
    want = merged(tmp_path, text.format(**_names(tiny, dtype, "-f32")), "f32", out_dtype="bfloat16")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name


def test_float8_merge_in_a_spec_dtype_and_validated(tiny, tmp_path):
    """dtype: bfloat16 rounds the float8 inputs to bfloat16 first (exact), then as for float32 inputs; the output
    passes its validation (structure, finite, recomputation bit-exact, forward)."""
    text = METHODS["ties"] + "dtype: bfloat16\n"
    spec = write_spec(tmp_path / "spec.yaml", text.format(**_names(tiny, E4M3)))
    result = run_merge(str(spec), tmp_path / "fp8", progress=False)
    assert result.validation.passed, str(result.validation)
    want = merged(tmp_path, text.format(**_names(tiny, E4M3, "-f32")), "f32")
    got = read_folder(tmp_path / "fp8")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_nan_in_a_float8_input_is_named(tiny, tmp_path, method):
    bad = _convert(tiny / "ft-a-float8_e4m3fn-f32", tmp_path / "bad", torch.float32)
    tensors = load_file(str(bad / MODEL_FILE))
    tensors[EMBED][1, 3] = float("nan")
    save_file({k: v.to(E4M3) for k, v in tensors.items()}, str(bad / MODEL_FILE))
    names = {**_names(tiny, E4M3), "a": bad}
    spec = write_spec(tmp_path / "spec.yaml", METHODS[method].format(**names))
    with pytest.raises(ModelError) as caught:
        run_merge(str(spec), tmp_path / "out", progress=False, validate=False, out_dtype="float32")
    assert (caught.value.file, caught.value.where, caught.value.what) == (
        str(bad), f"tensor '{EMBED}'", "the input already holds 1 NaN value, the first at [1, 3]")


@pytest.mark.parametrize("dtype", sorted(FLOAT8, key=str), ids=lambda d: str(d)[6:])
def test_nonfinite_counting_of_float8(dtype):
    from mergekit_lite.engine.nonfinite import count_nonfinite

    values = torch.tensor([0.5, 1.0, -2.0, float("nan")]).to(dtype)
    assert count_nonfinite(values[:3]) is None
    assert count_nonfinite(values) == (1, 0, 3)


def test_lora_fold_into_a_float8_base(tiny, tmp_path):
    """The fold is computed in float32 on the upcast base; written in --out-dtype, refused without one."""
    from mergekit_lite import fold_lora
    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), TINY, seed=3)
    base = tiny / "base-float8_e4m3fn"
    fold_lora(base, adapter, tmp_path / "fp8", out_dtype="bfloat16", progress=False, validate=False,
              check_base=False)
    fold_lora(tiny / "base-float8_e4m3fn-f32", adapter, tmp_path / "f32", out_dtype="bfloat16", progress=False,
              validate=False, check_base=False)
    got, want = read_folder(tmp_path / "fp8"), read_folder(tmp_path / "f32")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ModelError, match="float8 weights are read and merged in float32, but the output needs a dtype"):
        fold_lora(base, adapter, tmp_path / "none", progress=False, validate=False, check_base=False)


def test_validating_a_float8_folder_scans_it(cli, tiny):
    from mergekit_lite import validate

    report = validate(tiny / "base-float8_e4m3fn", device="cpu", forward=False)
    finite = report.check("finite")
    assert finite.status == "passed" and finite.numbers["nan"] == 0 and finite.numbers["values"] > 0


# ------------------------------------------------------------------------------------------------ zero-size

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("empty", [(0, 16), (16, 0), (0,)], ids=["rows", "columns", "vector"])
def test_zero_size_tensor_is_refused_by_every_layout_before_reading(tiny, tmp_path, monkeypatch, method, empty):
    from mergekit_lite.plan.planner import make_plan
    from mergekit_lite.sources.checkpoint import Checkpoint

    name = "model.layers.1.self_attn.k_proj.weight"
    names = {}
    for key, source in (("base", "base"), ("a", "ft-a"), ("b", "ft-b")):
        folder = shutil.copytree(tiny / source, tmp_path / source)
        tensors = load_file(str(folder / MODEL_FILE))
        save_file({**tensors, name: torch.zeros(empty)}, str(folder / MODEL_FILE))
        names[key] = folder

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", no_read)
    with pytest.raises(ModelError) as caught:
        make_plan(METHODS[method].format(**names))
    assert caught.value.where == f"tensor '{name}'"
    assert caught.value.what == f"has a zero-size dimension (shape {list(empty)}): it holds no values"


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), (" 500 MB ", 5 * 10**8), ("1.5", 1),
                                        ("9223372036854775807", 2**63 - 1), (10, 10), (5e9, 5 * 10**9)])
def test_sizes(text, size):
    from mergekit_lite.units import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [
    ("1e999GB", "'1e999GB' is larger than any file can be (at most 9.22 EB)"),
    ("1e99999999999999TB", "'1e99999999999999TB' is larger than any file can be"),
    ("9223372036854775808", "is larger than any file can be"),
    ("inf", "'inf' is not a size"), ("nan", "'nan' is not a size"), (float("inf"), "'inf' is not a size"),
    (float("nan"), "'nan' is not a size"), ("-5GB", "'-5GB' is not a size"), ("0", "'0' must be at least 1 byte"),
    ("1e-3", "'1e-3' must be at least 1 byte"), ("1e-99999999999", "must be at least 1 byte"),
    (0, "0 must be at least 1 byte"), (-1, "-1 must be at least 1 byte"), (2**70, "is larger than any file can be"),
    (True, "True is not a size"), ("5 parsecs", "'5 parsecs' is not a size"),
])
def test_sizes_refused(text, message):
    from mergekit_lite.units import parse_size

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_size(text)


def test_size_setting_of_the_api_is_a_usage_error(tiny, tmp_path):
    spec = METHODS["linear"].format(**_names(tiny, E4M3, "-f32"))
    with pytest.raises(UsageError, match="at least 1 byte") as caught:
        run_merge(spec, tmp_path / "out", max_shard_size=0)
    assert caught.value.where == "max_shard_size"


@pytest.mark.parametrize("name, message", [
    ("meta", "the meta device holds no data, so nothing can be merged on it"),
    ("xla", "device 'xla' cannot be used by this PyTorch build"),
    ("hpu", "device 'hpu' cannot be used by this PyTorch build"),
    ("vulkan", "device 'vulkan' cannot be used by this PyTorch build"),
    ("foo", "unknown device 'foo'"), ("", "unknown device ''"), ("cuda:x", "unknown device 'cuda:x'"),
    (torch.device("meta"), "the meta device holds no data, so nothing can be merged on it"),
])
def test_devices_refused(name, message):
    from mergekit_lite.engine.devices import resolve_device

    with pytest.raises(UsageError) as caught:
        resolve_device(name)
    assert (caught.value.where, caught.value.what) == ("device", message)


def test_cuda_device_that_does_not_exist():
    from mergekit_lite.engine.devices import resolve_device

    with pytest.raises(UsageError) as caught:
        resolve_device("cuda:99")
    if torch.cuda.is_available():
        assert caught.value.what.startswith("there is no CUDA device 99: this machine has ")
    else:
        assert caught.value.what == "CUDA was asked for but is not available"


def test_devices_accepted():
    from mergekit_lite.engine.devices import resolve_device

    assert resolve_device("cpu") == resolve_device("CPU:0") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["run", "fold", "validate"])
def test_every_command_refuses_the_meta_device(cli, tiny, tmp_path, command):
    spec = write_spec(tmp_path / "spec.yaml", METHODS["linear"].format(**_names(tiny, E4M3, "-f32")))
    args = {"run": ["run", spec, "-o", tmp_path / "out"], "fold": ["fold", tiny / "base", tmp_path, "-o", tmp_path / "o"],
            "validate": ["validate", tiny / "base"]}[command]
    result = cli(*args, "--device", "meta")
    assert (result.exit_code, result.stderr) == (2, "error: --device: the meta device holds no data, so nothing can "
                                                    "be merged on it\nHint: use auto, cpu, cuda or cuda:N\n")


# ------------------------------------------------------------------------------------------------ references

@pytest.mark.parametrize("entry, where, what", [
    ("models:\n  - model: ~\n  - model: {b}\n", "models[0].model", "the model is empty (null)"),
    ("models:\n  - model:\n  - model: {b}\n", "models[0].model", "the model is empty (null)"),
    ("models:\n  - model: ''\n  - model: {b}\n", "models[0].model", "empty model reference"),
    ("models:\n  - ~\n  - model: {b}\n", "models[0]", "expected a mapping, got nothing (null)"),
    ("models:\n  - model: {{model: ~}}\n", "models[0].model.model", "expected a path string or {path, revision}"),
    ("models:\n  - model: {{model: {{path: ~}}}}\n", "models[0].model.model.path", "the path is empty"),
    ("models:\n  - model: {{model: {{path: ' '}}}}\n", "models[0].model.model.path", "the path is empty"),
    ("models:\n  - model: {{model: {{path: 5}}}}\n", "models[0].model.model.path", "the path must be a string, got int"),
    ("models:\n  - model: {{model: {{path: org/x, revision: ~}}, lora: {{path: ~}}}}\n",
     "models[0].model.lora.path", "the path is empty"),
    ("models:\n  - model: {{model: {b}, lora: {{path: ''}}}}\n", "models[0].model.lora", "'' is not a model reference"),
    ("models:\n  - model: {{model: {b}, lora: [~]}}\n", "models[0].model.lora[0]",
     "expected a path string or {path, revision}"),
    ("models:\n  - model: {{model: {{path: org/x, revision: ''}}}}\n", "models[0].model.model.revision",
     "revision must be a branch, tag or commit, got ''"),
    ("models:\n  - model: {{model: {{path: org/x, revision: [main]}}}}\n", "models[0].model.model.revision",
     "revision must be a branch, tag or commit, got ['main']"),
    ("base_model: ''\nmodels:\n  - model: {b}\n", "base_model", "empty model reference"),
    ("tokenizer_source: ''\nmodels:\n  - model: {b}\n", "tokenizer_source", "empty model reference"),
    ("slices:\n  - sources:\n    - model: ~\n      layer_range: [0, 1]\n", "slices[0].sources[0].model",
     "the model is empty (null)"),
    ("slices:\n  - sources:\n    - model: {b}\n      layer_range: [0, 1]\n    base_model: ''\n",
     "slices[0].base_model", "empty model reference"),
    ("slices:\n  - sources:\n    - ~\n", "slices[0].sources[0]", "expected a mapping, got nothing (null)"),
    ("models:\n  - model: ./ft-b@main\n", "models[0].model",
     "no local folder './ft-b@main', and './ft-b' is not a Hub repo id, so '@main' cannot be its revision"),
    ("models:\n  - model: /nowhere/ft-b@v1\n", "models[0].model",
     "no local folder '/nowhere/ft-b@v1', and '/nowhere/ft-b' is not a Hub repo id, so '@v1' cannot be its revision"),
    ("models:\n  - model: {{model: {{path: ../ft-b, revision: main}}}}\n", "models[0].model.model",
     "no local folder '../ft-b', and '../ft-b' is not a Hub repo id, so '@main' cannot be its revision"),
])
def test_null_and_empty_references(tiny, entry, where, what):
    from mergekit_lite.spec.schema import load_spec

    with pytest.raises(SpecError) as caught:
        load_spec("merge_method: linear\n" + entry.format(b=tiny / "ft-b"))
    assert (caught.value.where, caught.value.what) == (where, what)


def test_null_optional_references_mean_unset(tiny):
    """base_model: ~ and tokenizer_source: ~ are "not given", as in mergekit."""
    from mergekit_lite.spec.schema import load_spec

    spec = load_spec(f"merge_method: linear\nbase_model: ~\ntokenizer_source: ~\nmodels:\n  - model: {tiny / 'ft-b'}\n")
    assert spec.base_model is None and spec.tokenizer_source is None


def test_hub_repo_ids_are_what_huggingface_hub_accepts():
    from huggingface_hub.utils import validate_repo_id

    from mergekit_lite.spec.references import REPO_ID

    for text in ("org/name", "a/b", "models/ft-b", "Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-8B", "org/x_1.2"):
        assert REPO_ID.match(text), text
        validate_repo_id(text)
    for text in ("./ft-b", "../x", "/abs/x", "~/x", "org/na..me", "org--x/y", "org/name.", "org/-x", "x" * 60 + "/y" * 20,
                 "a/b/c", "name"):
        assert not REPO_ID.match(text), text


# ------------------------------------------------------------------------------------------------ the Hub

SPEC = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n" \
       "    parameters: {{weight: 0.5}}\n"


@pytest.fixture
def hub_here(fake_hub, monkeypatch, tmp_path):
    """This process's huggingface_hub pointed at the fake Hub (as tests/test_pull.py does)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake_hub


def _run(cli, tmp_path, tiny, b: str):
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(a=tiny / "ft-a", b=b))
    return spec, cli("run", spec, "-o", tmp_path / "out")


CHECK_PATH = "check the path (relative paths are relative to the current directory); for a Hub repo, "


def test_mistyped_local_path_with_the_hub_unreachable(cli, hub_here, tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    spec, result = _run(cli, tmp_path, tiny, "models/ft-b")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {spec}: models[1].model: no local folder 'models/ft-b', and the Hub could not be reached when asked "
        "for it as a repo (ConnectError: [Errno 111] Connection refused); it is not in the local Hub cache either\n"
        f"Hint: {CHECK_PATH}check the network connection (and HF_ENDPOINT), then re-run\n"))
    spec, result = _run(cli, tmp_path, tiny, "org/ft-b@v1")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {spec}: models[1].model: cannot reach the Hub to look up 'org/ft-b@v1' (ConnectError: [Errno 111] "
        "Connection refused), and it is not in the local cache\n"
        "Hint: check the network connection (and HF_ENDPOINT), then re-run\n"))
    assert not (tmp_path / "out").exists()


def test_mistyped_local_path_offline(cli, hub_here, tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spec, result = _run(cli, tmp_path, tiny, "models/ft-b")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {spec}: models[1].model: no local folder 'models/ft-b', and as a Hub repo it is not in the local Hub "
        f"cache (HF_HUB_OFFLINE is set)\nHint: {CHECK_PATH}unset HF_HUB_OFFLINE, or download it once while online\n"))
    assert hub_here.log == []


def test_mistyped_local_path_not_on_the_hub(cli, hub_here, tiny, tmp_path):
    spec, result = _run(cli, tmp_path, tiny, "models/ft-b")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {spec}: models[1].model: no local folder 'models/ft-b' and no Hub repository of that name\n"
        "Hint: check the spelling; for a private repo run `hf auth login` or set HF_TOKEN\n"))


@pytest.mark.parametrize("reference", ["./ft-b@main", "../ft-b@main", "/abs/ft-b@main", "~/ft-b@main",
                                       "./org/ft-b", "org/ft-b/"])
def test_explicit_local_paths_never_reach_the_hub(cli, hub_here, tiny, tmp_path, reference):
    hub_here.add_repo("org/ft-b", {"config.json": b"{}", "model.safetensors": b"\0" * 8})
    spec, result = _run(cli, tmp_path, tiny, reference)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.stderr
    assert hub_here.log == []


@pytest.mark.parametrize("fault, expected", [
    (dict(status=500, message="the Hub is down"), "no local folder 'org/ft-b', and the Hub answered 500 when asked "
     "for it as a repo (HfHubHTTPError: the Hub is down); it is not in the local Hub cache either\n"),
    (dict(drop=True), "no local folder 'org/ft-b', and the Hub could not be reached when asked for it as a repo ("),
    (dict(status=429, message="slow down"), None),
])
def test_hub_failures_while_resolving(cli, hub_here, tiny, tmp_path, fault, expected):
    hub_here.fail("GET", r"^/api/models/org/ft-b", **fault)
    spec, result = _run(cli, tmp_path, tiny, "org/ft-b")
    assert result.exit_code == 1 and "Traceback" not in result.output and "internal error" not in result.output
    message = result.stderr.removeprefix(f"error: {spec}: models[1].model: ")
    if expected is None:   # the Hub answered: its words, and that a retry may help
        assert message.startswith("the Hub answered 429 for 'org/ft-b': ") and "slow down" in message, message
        assert message.endswith("Hint: re-run to retry; files already downloaded are kept\n")
    else:
        assert message.startswith(expected), message
        assert message.endswith(f"Hint: {CHECK_PATH}check the network connection (and HF_ENDPOINT), then re-run\n")


def _http_error(kind: str, status: int):
    from huggingface_hub import errors
    from huggingface_hub.utils import httpx  # httpx, or httpx2 on huggingface_hub 2.x

    response = httpx.Response(status, request=httpx.Request("GET", "https://hub.test/api/models/org/x"),
                              headers={"X-Error-Message": f"{kind} said no"})
    return getattr(errors, kind)(f"{kind} said no", response=response)


def _errors():
    from huggingface_hub import errors

    return [
        (_http_error("GatedRepoError", 403), "'org/x' is gated: your account has not been granted access"),
        (_http_error("RepositoryNotFoundError", 404), "no local folder 'org/x' and no Hub repository of that name"),
        (_http_error("RevisionNotFoundError", 404), "revision 'None' of 'org/x' not found"),
        (_http_error("DisabledRepoError", 403), "'org/x' has been disabled on the Hub"),
        (_http_error("RemoteEntryNotFoundError", 404), "a file of 'org/x' is no longer on the Hub: "),
        (_http_error("BadRequestError", 400), "the Hub answered 400 for 'org/x': "),
        (_http_error("HfHubHTTPError", 503), "the Hub answered 503 for 'org/x': "),
        (errors.HFValidationError("Repo id must be ..."), "'org/x' is not a valid Hub reference: Repo id must be"),
        (errors.OfflineModeIsEnabled("offline"), "no local folder 'org/x', and as a Hub repo it is not in the local"),
        (errors.RevisionResolutionError("Cannot resolve"), "no local folder 'org/x', and the Hub could not be reached "
         "when asked for it as a repo (RevisionResolutionError: Cannot resolve)"),
        (errors.LocalEntryNotFoundError("not cached"), "could not reach the Hub while downloading 'org/x': "),
        (errors.IncompleteSnapshotError("incomplete", "/x"), "could not reach the Hub while downloading 'org/x': "),
        (errors.XetDownloadError("xet failed"), "could not reach the Hub while downloading 'org/x': "),
        (OSError(28, "No space left on device"), "download of 'org/x' failed: [Errno 28] No space left on device"),
        (ValueError("something new"), "the Hub client failed on 'org/x': ValueError: something new"),
    ]


def test_every_hub_failure_becomes_a_hub_error():
    """No exception of huggingface_hub escapes: each class maps to a HubError saying what to do."""
    from mergekit_lite.hub.pull import _error
    from mergekit_lite.spec.references import ModelPath

    for exc, start in _errors():
        error = _error(exc, ModelPath("org/x"), "models[1].model")
        assert isinstance(error, HubError) and error.hint, type(exc)
        assert error.what.startswith(start), (type(exc), error.what)


def test_partly_cached_repo_offline(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from mergekit_lite.hub.pull import _from_cache
    from mergekit_lite.spec.references import ModelPath

    def incomplete(*args, **kwargs):
        raise errors.IncompleteSnapshotError("some files are missing", "/cache/snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(HubError) as caught:
        _from_cache(ModelPath("org/x"), "base_model", ("*.safetensors",), cause=None)
    assert (caught.value.what, caught.value.hint) == (
        "'org/x' is only partly in the local Hub cache (an interrupted download), and HF_HUB_OFFLINE is set",
        "re-run once online: the download resumes")


# ------------------------------------------------------------------------------------------------ configs

def _config_variant(tiny: Path, tmp_path: Path, name: str, source: str = "ft-b", **changes) -> Path:
    return edit_config(shutil.copytree(tiny / source, tmp_path / name), **changes)


def _plan_error(text: str) -> ModelError:
    from mergekit_lite.plan.planner import make_plan

    with pytest.raises(ModelError) as caught:
        make_plan(text)
    return caught.value


def test_disagreeing_configs_are_refused_with_every_key_and_value(tiny, tmp_path):
    other = _config_variant(tiny, tmp_path, "other", rope_theta=500000.0, hidden_act="gelu", max_position_embeddings=None,
                            rope_scaling={"type": "linear", "factor": 2.0})
    a = tiny / "ft-a"
    error = _plan_error(METHODS["linear"].format(a=a, b=other))
    assert error.what == (
        "the models' config.json disagree on settings that change what the model computes: "
        f"rope_theta ({a}: 10000.0, {other}: 500000.0); rope_scaling ({a}: not set, {other}: "
        '{"factor": 2.0, "rope_type": "linear"}); '
        f"max_position_embeddings ({a}: 2048, {other}: not set); hidden_act ({a}: \"silu\", {other}: \"gelu\"); "
        f"the output would silently take {a}'s")


@pytest.mark.parametrize("method", ["linear", "stacking", "concat", "ties"])
def test_every_layout_compares_configs(tiny, tmp_path, method):
    other = _config_variant(tiny, tmp_path, "other", rms_norm_eps=1e-6)
    error = _plan_error(METHODS[method].format(a=tiny / "ft-a", b=other, base=tiny / "base"))
    assert error.what.startswith("the models' config.json disagree on settings that change what the model "
                                 "computes: rms_norm_eps (") and f"{tiny / 'ft-a'}: 1e-05, {other}: 1e-06)" in error.what


def test_nested_text_config_is_compared(tiny, tmp_path):
    a = _config_variant(tiny, tmp_path, "a", source="ft-a", text_config={"sliding_window": 4096})
    b = _config_variant(tiny, tmp_path, "b", text_config={"sliding_window": 8192})
    error = _plan_error(METHODS["linear"].format(a=a, b=b))
    assert f"text_config.sliding_window ({a}: 4096, {b}: 8192)" in error.what


def test_equal_settings_written_differently_agree(tiny, tmp_path):
    """transformers 5's rope_parameters against 4.x's rope_theta; a head_dim left out against the one it implies;
    layer_types of full attention only, and a sliding window switched off, against none; and a model only used for
    its tokenizer is not compared."""
    from mergekit_lite.plan.planner import make_plan

    v5 = _config_variant(tiny, tmp_path, "v5", rope_theta=None, head_dim=None,
                         rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                         layer_types=["full_attention"] * TINY.layers, use_sliding_window=False, sliding_window=4096,
                         max_window_layers=28)
    odd = _config_variant(tiny, tmp_path, "odd", rope_theta=1.0)
    plan = make_plan(METHODS["linear"].format(a=tiny / "ft-a", b=v5) + f"tokenizer_source: {odd}\n")
    assert plan.config["rope_theta"] == 10000.0 and plan.config_from is None
    plan.close()


@pytest.mark.parametrize("changes, key", [
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (dict(head_dim=4), "head_dim"),
    (dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
])
def test_settings_that_do_differ(tiny, tmp_path, changes, key):
    other = _config_variant(tiny, tmp_path, "other", **changes)
    assert f"{key} (" in _plan_error(METHODS["linear"].format(a=tiny / "ft-a", b=other)).what


def test_config_from_chooses_the_output_config(cli, tiny, tmp_path):
    other = _config_variant(tiny, tmp_path, "other", rope_theta=500000.0)
    spec = write_spec(tmp_path / "spec.yaml", METHODS["linear"].format(a=tiny / "ft-a", b=other))
    result = cli("run", spec, "-o", tmp_path / "out", "--config-from", other, "--quiet")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == json.loads((other / "config.json").read_text())
    settings = json.loads((tmp_path / "out" / "merge_run.json").read_text())
    assert settings["config_from"] == "models[1].model"
    assert "config.json is " + str(other) + "'s (--config-from); the models disagree on rope_theta" in \
        (tmp_path / "out" / "README.md").read_text()
    again = cli("validate", tmp_path / "out", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["passed"], again.output
    plain = merged(tmp_path, METHODS["linear"].format(a=tiny / "ft-a", b=tiny / "ft-b"), "plain")
    assert all(torch.equal(t, read_folder(tmp_path / "out")[k]) for k, t in plain.items())   # the tensors are the same


def test_config_from_keeps_the_layouts_own_edits(tiny, tmp_path):
    """Stacking sets the layer count: the chosen model's config gets it too."""
    from mergekit_lite.plan.planner import make_plan

    other = _config_variant(tiny, tmp_path, "other", rope_theta=500000.0)
    text = METHODS["stacking"].format(a=tiny / "ft-a", b=other)
    plan = make_plan(text, config_from="slices[1].sources[0]")
    assert (plan.config["num_hidden_layers"], plan.config["rope_theta"]) == (3, 500000.0)
    assert plan.config_from == "slices[1].sources[0].model"
    plan.close()
    plan = make_plan(text, config_from=str(tiny / "ft-a"))
    assert (plan.config["num_hidden_layers"], plan.config["rope_theta"]) == (3, 10000.0)
    plan.close()


def test_config_from_must_name_a_merged_model(tiny, tmp_path):
    from mergekit_lite.plan.planner import make_plan

    odd = _config_variant(tiny, tmp_path, "odd", rope_theta=1.0)
    with pytest.raises(UsageError) as caught:
        make_plan(METHODS["linear"].format(a=tiny / "ft-a", b=tiny / "ft-b") + f"tokenizer_source: {odd}\n",
                  config_from=str(odd))
    assert caught.value.where == "config_from"
    assert caught.value.hint == f"give one as the spec writes it: {tiny / 'ft-a'}, {tiny / 'ft-b'}"
