"""The command line as a mergekit user meets it: `merge run --push-to-hub` takes `merge push`'s card
flags with the same meaning and checks; `-q` silences every bar, huggingface_hub's "Fetching N files" included;
after a merge, validation shows a bar while it runs and then one verdict line with what each check cost (the
per-check table only on failure or with -v)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers.fakehub import folder_files
from helpers.hubcli import hub_env, merge, mock_downloads, point_at
from helpers.models import read_folder, write_spec

from mergekit_lite.hub.push_plan import card_metadata

LINEAR = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


# --- merge run --push-to-hub --license --base-model -------------------------------------------------------------

def test_run_push_sends_the_card_merge_push_would(models_f32, fake_hub, tmp_path):
    """The pushed README.md is the written card with the front matter `merge push --license --base-model` gives
    it (card_metadata, tested against the Hub's rules in test_push_flags.py); the local card stays as written."""
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(a=models_f32 / "ft-a", b=models_f32 / "ft-b"))
    env = hub_env(fake_hub, tmp_path / "home", xet=False)
    result = merge("run", spec, tmp_path / "out", "--no-validate", "--push-to-hub", "user/merged", "--license",
                   "apache-2.0", "--base-model", "org/a", "--base-model", "org/b", "-q", env=env)
    assert result.returncode == 0, result.stderr
    on_disk = (tmp_path / "out" / "README.md").read_bytes()
    sent = fake_hub.files("user/merged")["README.md"].data
    assert sent == card_metadata(on_disk, "apache-2.0", ["org/a", "org/b"]) != on_disk
    assert b"license: apache-2.0\n" in sent and b"base_model:\n- org/a\n- org/b\n" in sent
    assert (result.stdout, result.stderr) == ("", "")   # -q


@pytest.mark.parametrize("flags, message", [
    (["--push-to-hub", "user/x", "--license", "Apache 2.0"],
     "error: --license: 'Apache 2.0' is not a license identifier of the Hub\n"),
    (["--push-to-hub", "user/x", "--base-model", "./local/model"],
     "error: --base-model: './local/model' is not a Hub repo id\n"),
    (["--license", "mit"], "error: --license: --license only applies with --push-to-hub\n"),
    (["--base-model", "org/a"], "error: --base-model: --base-model only applies with --push-to-hub\n"),
    (["--push-to-hub", "user/x", "--license", "mit", "--no-write-model-card"],
     "error: --license: there would be no README.md (model card) to write the license or base models into\n"),
])
def test_run_checks_the_card_flags_before_merging(cli, models_f32, tmp_path, flags, message):
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(a=models_f32 / "ft-a", b=models_f32 / "ft-b"))
    result = cli("run", spec, tmp_path / "out", *flags)
    assert result.exit_code == 2 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --- -q silences huggingface_hub's bars -------------------------------------------------------------------------

@pytest.fixture
def hub_inputs(fake_hub, models_f32, monkeypatch, tmp_path):
    """org/ft-a and org/ft-b resolve on the fake Hub in this process; the download itself is mocked (a download
    from this process would go to conftest's closed port): it draws huggingface_hub's own bar, as the real
    snapshot_download does, and returns a copy of the model folder."""
    for name in ("ft-a", "ft-b"):
        fake_hub.add_repo(f"org/{name}", folder_files(models_f32 / name))
    point_at(fake_hub, monkeypatch, tmp_path / "cache")
    mock_downloads(monkeypatch, models_f32, tmp_path / "snapshots")
    return fake_hub


def test_quiet_silences_huggingface_hubs_bars_and_restores_them(cli, hub_inputs, models_f32, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    if constants.HF_HUB_DISABLE_PROGRESS_BARS:
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: no bar to silence")
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(a="org/ft-a", b="org/ft-b"))
    quiet = cli("run", spec, tmp_path / "quiet", "-q", "--device", "cpu")   # validated too: not a line
    assert quiet.exit_code == 0, quiet.output
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert not are_progress_bars_disabled()   # switched off for the command only
    loud = cli("run", spec, tmp_path / "loud", "--no-validate", "--device", "cpu")
    assert loud.exit_code == 0, loud.output
    assert re.search(r"Fetching \d+ files: 100%", loud.stderr)   # the bar -q silenced, drawn without it
    local = LINEAR.format(a=models_f32 / "ft-a", b=models_f32 / "ft-b")
    assert cli("run", write_spec(tmp_path / "local.yaml", local), tmp_path / "local", "--no-validate",
               "-q").exit_code == 0
    expected, got = read_folder(tmp_path / "local"), read_folder(tmp_path / "quiet")
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got)


# --- the verdict line -------------------------------------------------------------------------------------------

VERDICT = re.compile(r"Validation passed on cpu in (\d+\.\d) s: structure (\d+\.\d) s, finite (\d+\.\d) s, "
                     r"recompute (\d+\.\d) s \(\d+/\d+ tensors bit-exact\), forward (\d+\.\d) s \(loss [^)]*\)")


def test_run_merge_without_progress_draws_no_hub_bar(hub_inputs, models_f32, tmp_path, capsys):
    """run_merge(progress=False), a notebook's quiet merge: no bar at all, huggingface_hub's download bar included,
    and the process-wide switch is back on after it; with progress (the default) the same download draws it."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    from mergekit_lite import run_merge

    if constants.HF_HUB_DISABLE_PROGRESS_BARS:
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: no bar to silence")
    spec = LINEAR.format(a="org/ft-a", b="org/ft-b")
    run_merge(spec, tmp_path / "quiet", progress=False, validate=False, device="cpu")
    assert capsys.readouterr().err == ""
    assert not are_progress_bars_disabled()
    run_merge(spec, tmp_path / "loud", validate=False, device="cpu")
    assert re.search(r"Fetching \d+ files: 100%", capsys.readouterr().err)
    quiet, loud = read_folder(tmp_path / "quiet"), read_folder(tmp_path / "loud")
    a, b = read_folder(models_f32 / "ft-a"), read_folder(models_f32 / "ft-b")
    assert quiet.keys() == loud.keys() == a.keys() and all(quiet[k].equal(loud[k]) for k in quiet)
    assert all(torch.allclose(quiet[k], 0.5 * a[k] + 0.5 * b[k], rtol=1e-6, atol=1e-7) for k in quiet)


def test_one_verdict_line_with_each_checks_cost_and_the_table_with_v(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(a=models_f32 / "ft-a", b=models_f32 / "ft-b"))
    result = cli("run", spec, tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Merged ")
    total, *costs = map(float, VERDICT.fullmatch(lines[1]).groups())
    assert sum(costs) <= total + 0.25   # each rounded to 0.1 s; the total also holds planning the spec again
    assert "validating (forward)" in result.stderr   # the bar named the running check
    verbose = cli("run", spec, tmp_path / "v", "--device", "cpu", "-v")
    assert verbose.exit_code == 0, verbose.output
    table = verbose.stdout.splitlines()[1:]
    assert table[0].startswith(f"Validation of {tmp_path / 'v'} on cpu: PASSED (")
    assert [row.split()[:2] for row in table[1:5]] == [[name, "passed"] for name in
                                                       ("structure", "finite", "recompute", "forward")]
    assert all(re.search(r"\(\d+\.\d\d s\)$", row) for row in table[1:5])


# --- merge fold: the shard size rule of merge run; a recipe mergekit reads ----------------------------------------

@pytest.mark.parametrize("size, message", [
    ("1B", "error: --max-shard-size: '1B' is 1 bytes, which reads like mergekit's parameter count\n"),
    ("500kB", "error: --max-shard-size: '500kB' is 500,000 bytes: shards under 1 MB would split a model into "
              "thousands of files\n"),
])
def test_fold_refuses_the_shard_sizes_run_refuses(cli, models_f32, tmp_path, size, message):
    from helpers.models import SHAPE

    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    folded = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out", "--max-shard-size", size)
    spec = write_spec(tmp_path / "s.yaml", f"merge_method: passthrough\nmodels:\n  - model: {models_f32 / 'base'}\n")
    ran = cli("run", spec, tmp_path / "out", "--max-shard-size", size)
    assert folded.exit_code == ran.exit_code == 2
    assert folded.stderr.startswith(message) and folded.stderr == ran.stderr
    assert not (tmp_path / "out").exists()


def test_a_folds_recipe_is_mergekits_base_plus_adapter(cli, models_f32, tmp_path):
    """One adapter at weight 1: OUT/mergekit_config.yml says `model: base+adapter`, which mergekit reads and
    folds (through peft) to the same tensors, within a float32 rounding."""
    pytest.importorskip("peft")
    from helpers.mergekit_oracle import max_diff_in_scale_ulps
    from helpers.models import SHAPE

    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    folded = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out", "--no-validate", "-q")
    assert folded.exit_code == 0, folded.output
    recipe = (tmp_path / "out" / "mergekit_config.yml").read_text()
    assert f"- model: {models_f32 / 'base'}+{adapter}\n" in recipe
    mergekit_yaml(recipe, tmp_path / "mk", lora_merge_cache=str(tmp_path / "lora-cache"))
    ours, theirs = read_folder(tmp_path / "out"), read_folder(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    changed = [name for name in ours if not ours[name].equal(read_folder(models_f32 / "base")[name])]
    assert changed   # the adapter did change tensors, and mergekit changed them alike
    assert max(max_diff_in_scale_ulps(ours[name], theirs[name]) for name in ours) <= 1
    weighted = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "half", "--weight", "0.5", "--no-validate",
                   "-q")
    assert weighted.exit_code == 0 and "lora:" in (tmp_path / "half" / "mergekit_config.yml").read_text()


def mergekit_yaml(spec_text: str, out: Path, **options) -> None:
    """mergekit 0.1.5's run_merge on a spec, in-process (its LoRA path needs a cache folder: lora_merge_cache)."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(spec_text))
    run_merge(config, str(out), options=MergeOptions(quiet=True, **options), config_source=spec_text)
