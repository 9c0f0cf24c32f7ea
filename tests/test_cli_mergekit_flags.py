"""`merge run` with a mergekit user's habits: mergekit-yaml's CONFIG OUT and its flags (mergekit/options.py).

Each flag is driven from the command line; outputs are compared with the same merge spelled our way (a
mergekit flag must mean exactly its equivalent), shard sizes with mergekit's own parser (parse_kmb), and copied
files byte for byte with their sources."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from helpers.models import read_folder, write_spec

from mergekit_lite.testing.synthetic import LlamaShape, write_model

REPO = Path(__file__).parent.parent

LINEAR = """
merge_method: linear
base_model: {root}/ft-a
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.4}}
  - model: {root}/{other}
    parameters: {{weight: 0.6}}
"""

DARE = """
merge_method: dare_ties
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {root}/ft-b
    parameters: {{weight: 0.5, density: 0.5}}
"""


def spec(tmp_path: Path, root: Path, other: str = "ft-b", text: str = LINEAR) -> Path:
    return write_spec(tmp_path / "spec.yml", text.format(root=root, other=other))


def same_tensors(a: Path, b: Path) -> None:
    first, second = read_folder(a), read_folder(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --- CONFIG OUT, -o, -q, -v ---------------------------------------------------------------------------------

def test_out_is_positional_as_in_mergekit_and_o_still_works(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    positional = cli("run", config, tmp_path / "a", "--no-validate", "--device", "cpu")
    assert positional.exit_code == 0, positional.output
    option = cli("run", config, "-o", tmp_path / "b", "--no-validate", "--device", "cpu")
    assert option.exit_code == 0, option.output
    same_tensors(tmp_path / "a", tmp_path / "b")
    both = cli("run", config, tmp_path / "c", "-o", tmp_path / "d")
    assert both.exit_code == 2 and "two output folders given" in both.stderr
    neither = cli("run", config)
    assert neither.exit_code == 2 and "OUT: no output folder given" in neither.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_quiet_prints_nothing_and_verbose_says_how_it_runs(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    quiet = cli("run", config, tmp_path / "q", "-q", "--no-validate", "--device", "cpu")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = cli("run", config, tmp_path / "v", "-v", "--no-validate", "--device", "cpu", "-j", "2")
    assert verbose.exit_code == 0, verbose.output
    assert "linear of 2 model(s)" in verbose.stderr and "on cpu" in verbose.stderr
    assert "2 merging thread(s)" in verbose.stderr and "shards of at most 5.00 GB" in verbose.stderr


def test_help_lists_the_dtype_and_device_values(cli):
    text = cli("run", "--help").stdout
    assert "--dtype [bfloat16|float16|float32|float64]" in text
    assert "--device [auto|cpu|cuda|cuda:N|mps]" in text
    assert "SPEC [OUT]" in text


# --- flags that mean what ours mean -------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when CUDA is absent")
def test_cuda_is_device_cuda(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    cuda = cli("run", config, tmp_path / "a", "--cuda")
    device = cli("run", config, tmp_path / "b", "--device", "cuda")
    assert cuda.exit_code == device.exit_code == 2
    assert cuda.stderr == device.stderr and "CUDA was asked for but is not available" in cuda.stderr
    clash = cli("run", config, tmp_path / "c", "--cuda", "--device", "cpu")
    assert clash.exit_code == 2 and "--cuda asks for the GPU" in clash.stderr


def test_random_seed_is_seed(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32, text=DARE)
    for out, flags in (("mk", ["--random-seed", "7"]), ("ours", ["--seed", "7"]), ("zero", [])):
        result = cli("run", config, tmp_path / out, "--no-validate", "--device", "cpu", *flags)
        assert result.exit_code == 0, result.output
    same_tensors(tmp_path / "mk", tmp_path / "ours")
    differs = read_folder(tmp_path / "mk")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(differs, read_folder(tmp_path / "zero")["model.layers.0.mlp.up_proj.weight"])
    clash = cli("run", config, tmp_path / "x", "--seed", "1", "--random-seed", "2")
    assert clash.exit_code == 2 and "--random-seed is mergekit's spelling of --seed" in clash.stderr


def test_num_threads_changes_no_number(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    for out, flags in (("one", ["-j", "1"]), ("three", ["--num-threads", "3"])):
        assert cli("run", config, tmp_path / out, "--no-validate", "--device", "cpu", *flags).exit_code == 0
    same_tensors(tmp_path / "one", tmp_path / "three")
    assert cli("run", config, tmp_path / "zero", "-j", "0").exit_code == 2


def test_copy_tokenizer_and_model_card_can_be_left_out(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    default = cli("run", config, tmp_path / "with", "--device", "cpu", "--copy-tokenizer", "--write-model-card")
    assert default.exit_code == 0, default.output
    without = cli("run", config, tmp_path / "without", "--device", "cpu", "--no-copy-tokenizer",
                  "--no-write-model-card")
    assert without.exit_code == 0, without.output
    assert (tmp_path / "with" / "README.md").is_file() and (tmp_path / "with" / "tokenizer.json").is_file()
    assert (tmp_path / "with" / "tokenizer.json").read_bytes() == (models_f32 / "ft-a" / "tokenizer.json").read_bytes()
    left = {"README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert not left & set(os.listdir(tmp_path / "without"))
    same_tensors(tmp_path / "with", tmp_path / "without")


# --- shard sizes ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Two models of ~4.5 MB (float32), so shards of a few MB are several."""
    root = tmp_path_factory.mktemp("wide")
    shape = LlamaShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=256)
    for name, delta in (("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), shape, seed=0, delta_seed=delta, tokenizer=False)
    return root


def shard_sizes(folder: Path) -> list[int]:
    return [sum(t.numel() * t.element_size() for t in read_folder_file(folder / name).values())
            for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]


def read_folder_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def mergekit_writer_breaks(folder: Path, count: int) -> list[int]:
    """Shard sizes mergekit's TensorWriter.save_tensor gives the same tensors in the same order: a new shard
    when the next tensor's bytes (numel * element_size) would take the current one over ``count``."""
    from safetensors import safe_open

    order = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with safe_open(str(folder / name), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        order += [t.numel() * t.element_size() for t in tensors.values()]
    shards, current = [], 0
    for size in order:
        if current and current + size > count:
            shards.append(current)
            current = 0
        current += size
    return shards + [current]


def test_out_shard_size_is_mergekits_count(cli, wide, tmp_path):
    from mergekit.common import parse_kmb

    from mergekit_lite.cli.mergekit_flags import shard_bytes

    for text in ("5B", "2M", "1500K", "3000000", "1b"):
        assert shard_bytes(None, text) == parse_kmb(text)
    config = spec(tmp_path, wide)
    result = cli("run", config, tmp_path / "mk", "--out-shard-size", "2M", "--no-validate", "--device", "cpu")
    assert result.exit_code == 0, result.output
    sizes = shard_sizes(tmp_path / "mk")
    assert len(sizes) >= 3 and max(sizes) <= 2_000_000   # mergekit's writer: tensor bytes <= the count
    assert sizes == mergekit_writer_breaks(tmp_path / "mk", parse_kmb("2M"))
    ours = cli("run", config, tmp_path / "ours", "--max-shard-size", "2MB", "--no-validate", "--device", "cpu")
    assert ours.exit_code == 0 and shard_sizes(tmp_path / "ours") == sizes
    both = cli("run", config, tmp_path / "x", "--out-shard-size", "2M", "--max-shard-size", "2MB")
    assert both.exit_code == 2 and "give one of --max-shard-size and --out-shard-size" in both.stderr


@pytest.mark.parametrize("size, message", [
    ("1B", "--max-shard-size: '1B' is 1 bytes, which reads like mergekit's parameter count"),
    ("57b", "use mergekit's --out-shard-size 57b"),
    ("500kB", "shards under 1 MB would split a model into thousands of files"),
    ("999999", "'999999' is 999,999 bytes"),
])
def test_max_shard_size_refuses_tiny_and_parameter_like_sizes(cli, models_f32, tmp_path, size, message):
    result = cli("run", spec(tmp_path, models_f32), tmp_path / "out", "--max-shard-size", size)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_out_shard_size_refuses_what_mergekit_cannot_parse(cli, models_f32, tmp_path):
    result = cli("run", spec(tmp_path, models_f32), tmp_path / "out", "--out-shard-size", "5GB")
    assert result.exit_code == 2 and "--out-shard-size: '5GB' is not a mergekit shard size" in result.stderr


# --- --allow-crimes ---------------------------------------------------------------------------------------------

def renamed(models: Path, tmp_path: Path, architecture: str) -> Path:
    """A copy of ft-b whose config.json names another architecture (same tensors)."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "ft-a").symlink_to(models / "ft-a", target_is_directory=True)
    shutil.copytree(models / "ft-b", root / "ft-x")
    config = json.loads((root / "ft-x" / "config.json").read_text())
    config["architectures"] = [architecture]
    (root / "ft-x" / "config.json").write_text(json.dumps(config))
    return root


def test_allow_crimes_mixes_architectures_with_a_warning(cli, models_f32, tmp_path):
    root = renamed(models_f32, tmp_path, "MistralForCausalLM")
    config = spec(tmp_path, root, other="ft-x")
    refused = cli("run", config, tmp_path / "out", "--device", "cpu")
    assert refused.exit_code == 1
    assert "different architectures: LlamaForCausalLM" in refused.stderr and "--allow-crimes" in refused.stderr
    assert not (tmp_path / "out").exists()
    crime = cli("run", config, tmp_path / "out", "--device", "cpu", "--allow-crimes")   # and validated
    assert crime.exit_code == 0, crime.output
    assert "warning: mixing architectures (--allow-crimes)" in crime.stderr
    assert "Still checked: every merged tensor's name and shape" in crime.stderr
    lawful = cli("run", spec(tmp_path, models_f32), tmp_path / "lawful", "--device", "cpu", "--no-validate")
    assert lawful.exit_code == 0
    same_tensors(tmp_path / "out", tmp_path / "lawful")   # the same tensors: only the name differed


def test_allow_crimes_still_checks_shapes(cli, models_f32, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "ft-a").symlink_to(models_f32 / "ft-a", target_is_directory=True)
    write_model(str(root / "wider"), LlamaShape(hidden=32, intermediate=128, layers=4, heads=4, kv_heads=2,
                                                vocab=256), seed=0)
    result = cli("run", spec(tmp_path, root, other="wider"), tmp_path / "out", "--allow-crimes")
    assert result.exit_code != 0 and "shape" in result.stderr
    assert not (tmp_path / "out").exists()


def test_mergekit_also_refuses_mixed_architectures_without_allow_crimes(models_f32, tmp_path):
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    root = renamed(models_f32, tmp_path, "MistralForCausalLM")
    config = MergeConfiguration.model_validate(yaml.safe_load(LINEAR.format(root=root, other="ft-x")))
    with pytest.raises(RuntimeError, match="--allow-crimes"):
        get_architecture_info(config, MergeOptions())
    get_architecture_info(config, MergeOptions(allow_crimes=True))


# --- --trust-remote-code ----------------------------------------------------------------------------------------

CODE = {   # a model with its own code (as on the Hub): here a renamed Llama, so transformers can run it
    "modeling_tiny.py": "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n"
                        "from .layers_tiny import MARK\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n"
                        "    config_class = TinyConfig\n",
    "configuration_tiny.py": "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    pass\n",
    "layers_tiny.py": "MARK = 1\n",
    "unrelated.py": "raise SystemExit('not named by auto_map: never copied nor run')\n",
}


def with_code(models: Path, tmp_path: Path, files: dict[str, str] = CODE) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    (root / "ft-b").symlink_to(models / "ft-b", target_is_directory=True)
    shutil.copytree(models / "ft-a", root / "ft-a")
    config = json.loads((root / "ft-a" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (root / "ft-a" / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (root / "ft-a" / name).write_text(text)
    return root


def test_trust_remote_code_copies_the_auto_map_code(cli, models_f32, tmp_path):
    root = with_code(models_f32, tmp_path)
    config = spec(tmp_path, root)
    result = cli("run", config, tmp_path / "out", "--device", "cpu", "--trust-remote-code", "--no-validate")
    assert result.exit_code == 0, result.output
    for name in ("modeling_tiny.py", "configuration_tiny.py", "layers_tiny.py"):
        assert (tmp_path / "out" / name).read_bytes() == (root / "ft-a" / name).read_bytes()
    assert not (tmp_path / "out" / "unrelated.py").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]["AutoConfig"].startswith("config")


def test_trust_remote_code_lets_the_forward_check_run_the_code(models_f32, tmp_path):
    pytest.importorskip("transformers")
    from mergekit_lite import run_merge

    root = with_code(models_f32, tmp_path)
    text = LINEAR.format(root=root, other="ft-b")
    trusted = run_merge(text, tmp_path / "trusted", device="cpu", progress=False, trust_remote_code=True)
    forward = next(check for check in trusted.validation.checks if check.name == "forward")
    assert forward.status == "passed", forward.summary
    untrusted = run_merge(text, tmp_path / "untrusted", device="cpu", progress=False)
    forward = next(check for check in untrusted.validation.checks if check.name == "forward")
    assert forward.status == "not_checked" and "auto_map" in forward.summary


def test_without_trust_remote_code_the_code_is_not_copied_and_it_says_so(cli, models_f32, tmp_path):
    root = with_code(models_f32, tmp_path)
    result = cli("run", spec(tmp_path, root), tmp_path / "out", "--device", "cpu", "--no-validate")
    assert result.exit_code == 0, result.output
    assert "needs its own code" in result.stderr and "configuration_tiny.py, modeling_tiny.py" in result.stderr
    assert "the output will not load until those files are added" in result.stderr
    assert "--trust-remote-code" in result.stderr
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "out"))


def test_trust_remote_code_refuses_missing_and_irregular_code_files(cli, models_f32, tmp_path):
    root = with_code(models_f32, tmp_path, {"configuration_tiny.py": "x = 1\n"})
    missing = cli("run", spec(tmp_path, root), tmp_path / "out", "--trust-remote-code")
    assert missing.exit_code == 1 and "modeling_tiny.py is not in the model folder" in missing.stderr
    (root / "ft-a" / "modeling_tiny.py").symlink_to("/etc/hostname")
    outside = cli("run", spec(tmp_path, root), tmp_path / "out", "--trust-remote-code")
    assert outside.exit_code == 1 and "modeling_tiny.py is a link that leaves the model folder" in outside.stderr
    (root / "ft-a" / "modeling_tiny.py").unlink()
    os.mkfifo(root / "ft-a" / "modeling_tiny.py")
    fifo = cli("run", spec(tmp_path, root), tmp_path / "out", "--trust-remote-code")
    assert fifo.exit_code == 1 and "cannot copy modeling_tiny.py" in fifo.stderr
    assert not (tmp_path / "out").exists()


# --- flags not needed here, and click's guesses -----------------------------------------------------------------

@pytest.mark.parametrize("flag, says", [
    ("--lazy-unpickle", "--lazy-unpickle: not needed, safetensors inputs are read one tensor at a time. Pickle "
                        "(*.bin) inputs are refused unless you add --allow-pickle: unpickling can run code"),
    ("--low-cpu-memory", "--low-cpu-memory: not needed, tensors are streamed"),
    ("--clone-tensors", "--clone-tensors: not needed"),
])
def test_flags_that_do_not_apply_say_why_in_one_line(cli, models_f32, tmp_path, flag, says):
    result = cli("run", spec(tmp_path, models_f32), tmp_path / "out", flag, "--device", "cpu", "--no-validate")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and says in notes[0]
    plain = cli("run", spec(tmp_path, models_f32), tmp_path / "plain", "--device", "cpu", "--no-validate", "-q")
    assert plain.exit_code == 0 and plain.stderr == ""
    same_tensors(tmp_path / "out", tmp_path / "plain")
    quiet = cli("run", spec(tmp_path, models_f32), tmp_path / "quiet", flag, "-q", "--device", "cpu", "--no-validate")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize("typo", ["--allow-pickel", "--allow-nonfinit", "--overwrit", "--trust-remote", "--allow-crime"])
def test_no_guess_points_at_a_safety_opt_in(cli, models_f32, tmp_path, typo):
    result = cli("run", spec(tmp_path, models_f32), tmp_path / "out", typo)
    assert result.exit_code == 2 and f"No such option '{typo}'." in result.stderr
    for guarded in ("--allow-pickle", "--allow-nonfinite", "--overwrite", "--trust-remote-code", "--allow-crimes"):
        assert guarded not in result.stderr


@pytest.mark.parametrize("command", ["fold", "validate"])
def test_no_other_command_guesses_a_safety_opt_in_either(cli, command):
    result = cli(command, "--allow-pickel")
    assert result.exit_code == 2 and "No such option '--allow-pickel'." in result.stderr
    assert "--allow-pickle" not in result.stderr


def test_other_guesses_are_kept_and_mergekit_only_flags_say_what_to_do(cli, models_f32, tmp_path):
    config = spec(tmp_path, models_f32)
    guess = cli("run", config, tmp_path / "out", "--max-shard")
    assert guess.exit_code == 2 and "--max-shard-size" in guess.stderr
    gpu = cli("run", config, tmp_path / "out", "--gpu-rich")
    assert gpu.exit_code == 2
    assert "--gpu-rich is a mergekit-yaml option with no equivalent here: use --device cuda" in gpu.stderr


def test_every_mergekit_yaml_flag_is_handled(cli):
    """Each option of mergekit's MergeOptions is accepted by `merge run` or refused with advice."""
    pytest.importorskip("mergekit")
    from mergekit.options import MergeOptions

    from mergekit_lite.cli.mergekit_flags import UNSUPPORTED
    from mergekit_lite.cli.run import run

    ours = {name for param in run.params for name in (*param.opts, *param.secondary_opts)}
    for field in MergeOptions.model_fields:
        flag = {"verbosity": "-v"}.get(field, "--" + field.replace("_", "-"))
        assert flag in ours or flag in UNSUPPORTED, flag


# --- the second console script ------------------------------------------------------------------------------------

def test_mergekit_lite_is_a_second_name_for_merge(monkeypatch, capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["merge"] == scripts["mergekit-lite"] == "mergekit_lite.cli:main"
    from mergekit_lite.cli import main

    monkeypatch.setattr(sys, "argv", ["/usr/bin/mergekit-lite", "run", "--help"])
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
        # the objects left are frozen for the interpreter's shutdown, on click's SystemExit path too
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
        gc.enable()
    assert exit_.value.code == 0 and "Usage: mergekit-lite run [OPTIONS] SPEC [OUT]" in capsys.readouterr().out
    assert frozen > 10_000


def test_validate_runs_the_models_own_code_only_with_trust_remote_code(cli, models_f32, tmp_path):
    """`merge validate --trust-remote-code` lets the forward check run the code auto_map names (here a renamed
    Llama): its loss is the plain Llama's loss on the same weights (computed without any own code)."""
    pytest.importorskip("transformers")
    root = with_code(models_f32, tmp_path)
    config = spec(tmp_path, root)
    assert cli("run", config, tmp_path / "out", "--trust-remote-code", "--no-validate", "-q").exit_code == 0
    untrusted = cli("validate", tmp_path / "out", "--device", "cpu", "--json")
    forward = next(c for c in json.loads(untrusted.stdout)["checks"] if c["name"] == "forward")
    assert untrusted.exit_code == 3 and forward["status"] == "not_checked"
    assert forward["summary"] == ("the model needs its own code (configuration_tiny.py, modeling_tiny.py, named by "
                                  "auto_map in config.json), which runs only with --trust-remote-code "
                                  "(trust_remote_code=True): read that code first, then add the flag")
    trusted = cli("validate", tmp_path / "out", "--device", "cpu", "--json", "--trust-remote-code")
    assert trusted.exit_code == 0, trusted.output
    forward = next(c for c in json.loads(trusted.stdout)["checks"] if c["name"] == "forward")
    plain = cli("run", spec(tmp_path, models_f32), tmp_path / "plain", "--device", "cpu", "-q")   # no auto_map
    assert plain.exit_code == 0, plain.output
    plain_report = cli("validate", tmp_path / "plain", "--device", "cpu", "--json")
    plain_forward = next(c for c in json.loads(plain_report.stdout)["checks"] if c["name"] == "forward")
    same_tensors(tmp_path / "out", tmp_path / "plain")
    assert forward["status"] == "passed"
    assert forward["numbers"]["merged_loss"] == plain_forward["numbers"]["merged_loss"] is not None


def test_validate_trust_remote_code_without_the_code_files_is_not_checked(cli, models_f32, tmp_path):
    root = with_code(models_f32, tmp_path)
    assert cli("run", spec(tmp_path, root), tmp_path / "out", "--no-validate", "-q").exit_code == 0   # code not copied
    result = cli("validate", tmp_path / "out", "--device", "cpu", "--trust-remote-code")
    assert result.exit_code == 3, result.output
    assert ("forward    NOT CHECKED  config.json's auto_map names configuration_tiny.py, modeling_tiny.py, which is "
            "not in the folder: merge again with --trust-remote-code to copy the model's code, or add the files"
            in result.stdout), result.stdout
