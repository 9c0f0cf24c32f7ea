"""Every hostile or broken input of tests/helpers/hostile/ gets its exact error and exit code; no planted code
runs; nothing that looks like a finished output is left; the shared inputs are never modified."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers.hostile import (
    CASES,
    MODEL_FILE,
    Models,
    build_models,
    hostile_pickle,
    leftover_problems,
    linear_spec,
    snapshot,
)
from helpers.hostile.catalogue import PlantedCode
from helpers.hostile.models import _poisoned


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("tiny"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case, cli, tiny, tmp_path):
    before = tree_digest(tiny.root)
    scenario = case.build(tmp_path, tiny)
    kept = snapshot(scenario.preserved)
    result = cli(*scenario.args)
    assert (result.exit_code, result.stderr) == (scenario.code, scenario.stderr)
    assert "Traceback" not in result.output and "internal error" not in result.output
    if scenario.marker is not None:
        assert not scenario.marker.exists(), "the planted code ran"
    assert leftover_problems(tmp_path / "out") == []
    assert tree_digest(tiny.root) == before
    assert snapshot(scenario.preserved) == kept, "the run deleted or changed a file it did not write"


def test_catalogue_covers_the_issue():
    groups = {c.group for c in CASES}
    assert groups == {"safetensors file", "shard index", "pickle", "spec", "models", "lora adapter",
                      "output ownership", "strict inputs", "push", "internal errors", "stages", "moe", "lora extract", "adapter merge",
                      "mergekit habits"}
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


def test_the_planted_pickle_runs_code_when_unpickled_unsafely(tmp_path):
    """The hostile pickle of the pickle cases is a real one: torch.load(weights_only=False) runs it."""
    marker = tmp_path / "pwned"
    hostile_pickle(tmp_path / "pickled", marker)
    torch.load(tmp_path / "pickled" / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(PlantedCode(f"open({str(marker)!r}, 'w').write('code ran')"), f, protocol=2)
    with open(tmp_path / "raw.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 - the point: this is what an unguarded loader does
    assert marker.read_text() == "code ran"


def test_the_planted_yaml_tag_runs_code_with_an_unsafe_loader(tmp_path):
    import yaml

    marker = tmp_path / "pwned"
    yaml.unsafe_load(f"!!python/object/apply:os.system ['touch {marker}']")
    assert marker.exists()


def test_pickle_opt_in_merges_a_clean_pickle_like_safetensors(cli, tiny, tmp_path):
    """--allow-pickle: a plain state dict merges to the same bytes as the safetensors model it was saved from."""
    from safetensors.torch import load_file

    state = load_file(str(tiny.b / MODEL_FILE))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_bytes((tiny.b / "config.json").read_bytes())
    linear_spec(tmp_path, tiny.a, pickled, name="pickled.yaml")
    linear_spec(tmp_path, tiny.a, tiny.b, name="plain.yaml")
    result = cli("run", tmp_path / "pickled.yaml", "-o", tmp_path / "from_pickle", "--allow-pickle", "--quiet")
    assert result.exit_code == 0, result.output
    assert cli("run", tmp_path / "plain.yaml", "-o", tmp_path / "plain", "--quiet").exit_code == 0
    got, want = load_file(str(tmp_path / "from_pickle" / MODEL_FILE)), load_file(str(tmp_path / "plain" / MODEL_FILE))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    a = load_file(str(tiny.a / MODEL_FILE))
    assert torch.equal(got["lm_head.weight"], (a["lm_head.weight"] * 0.5 + state["lm_head.weight"] * 0.5) / 1.0)


def test_sharded_pickle_index_is_checked_like_safetensors(cli, tiny, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny.b / MODEL_FILE))
    folder = tmp_path / "pickled"
    folder.mkdir()
    names = sorted(state)
    torch.save({n: state[n] for n in names[:5]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[5:]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: "pytorch_model-00001-of-00002.bin" if i < 5 else "pytorch_model-00002-of-00002.bin"
                  for i, n in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    spec = linear_spec(tmp_path, tiny.a, folder)
    assert cli("run", spec, "-o", tmp_path / "out", "--allow-pickle", "--quiet").exit_code == 0
    weight_map[names[0]] = "../evil.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = cli("run", spec, "-o", tmp_path / "out2", "--allow-pickle", "--quiet")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {folder}/pytorch_model.bin.index.json: models[1].model: shard name '../evil.bin' points outside the "
        "model folder\nHint: refusing it: shard names must be plain file names inside the folder\n"))


def test_nonfinite_opt_in_carries_on_and_says_so(cli, tiny, tmp_path):
    bad = _poisoned(tmp_path, tiny, float("nan"))
    spec = linear_spec(tmp_path, tiny.b, bad)
    result = cli("run", spec, "-o", tmp_path / "out", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    verdict = result.stdout.splitlines()[1]
    assert verdict.startswith("Validation NOT CHECKED on cpu in ")   # the merge succeeded: exit 0, but no PASSED
    assert re.fullmatch(r"Validation NOT CHECKED on cpu in [\d.]+ s: structure [\d.]+ s, finite [\d.]+ s, recompute "
                        r"[\d.]+ s \(21/21 tensors bit-exact\), forward NOT CHECKED (?:[\d.]+ s )?\(the weights hold 1 NaN/Inf "
                        r"values \(--allow-nonfinite\), so the logits would say nothing\)", verdict), verdict
    from safetensors.torch import load_file

    a = load_file(str(tiny.b / MODEL_FILE))["model.embed_tokens.weight"]
    merged = load_file(str(tmp_path / "out" / MODEL_FILE))["model.embed_tokens.weight"]
    assert torch.isnan(merged[1, 3]) and int(torch.isnan(merged).sum()) == 1
    assert torch.equal(merged[0], (a[0] * 0.5 + load_file(str(bad / MODEL_FILE))["model.embed_tokens.weight"][0] * 0.5))
    validated = cli("validate", tmp_path / "out", "--allow-nonfinite", "--json")
    allowed = json.loads(validated.stdout)
    finite = next(c for c in allowed["checks"] if c["name"] == "finite")
    assert (validated.exit_code, allowed["verdict"], finite["status"], finite["numbers"]["nan"]) == (
        3, "not_checked", "passed", 1)
    from mergekit_lite import validate

    refused = validate(tmp_path / "out", device="cpu", forward=False)   # without the opt-in
    finite = refused.check("finite")
    assert (refused.passed, finite.status, str(finite.failures[0])) == (
        False, "failed", "model.safetensors: tensor 'model.embed_tokens.weight': 1 NaN, the first at [1, 3]")


def test_tokenizer_from_the_hub_cache_may_link_into_its_blobs(tmp_path, tiny):
    """A Hugging Face cache snapshot is all links into ../../blobs: those stay inside the repository folder."""
    from mergekit_lite.sources.opener import open_checkpoint

    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(tiny.sharded):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes((tiny.sharded / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    checkpoint = open_checkpoint(str(snapshot))
    assert set(checkpoint.tensors) == set(open_checkpoint(str(tiny.sharded)).tensors)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((tiny.a / MODEL_FILE).read_bytes())
    first = sorted(p for p in os.listdir(snapshot) if p.endswith(".safetensors"))[0]
    (snapshot / first).unlink()
    (snapshot / first).symlink_to(outside)
    from mergekit_lite.errors import ModelError

    with pytest.raises(ModelError, match="is a link that leaves the model folder"):
        open_checkpoint(str(snapshot))


def test_nonfinite_counting_fast_path_and_overflowing_sums():
    from mergekit_lite.engine.nonfinite import count_nonfinite

    assert count_nonfinite(torch.tensor([3e38, 3e38, -1.0])) is None          # the sum overflows; the values do not
    assert count_nonfinite(torch.tensor([[1.0, float("inf")], [float("nan"), -float("inf")]])) == (1, 2, 1)
    assert count_nonfinite(torch.zeros(0)) is None and count_nonfinite(torch.tensor([1, 2])) is None
