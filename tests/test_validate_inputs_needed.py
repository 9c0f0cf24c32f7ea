"""After `merge run`, the forward check runs an input model only when the merge must equal it, decided from the
files: different inputs are not run (their losses are context, `merge validate` computes them); byte-identical
inputs run one of them as the reference, and a broken output still fails against it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from mergekit_lite import run_merge, validate
from mergekit_lite.validation import streamed
from mergekit_lite.validation.folder import read_output
from mergekit_lite.validation.same_inputs import same_weights

pytest.importorskip("transformers")

TWINS = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.1}}
  - model: {b}
    parameters: {{weight: 0.2}}
"""


@pytest.fixture(scope="module")
def twins(models_f32, tmp_path_factory) -> tuple[Path, Path]:
    copy = tmp_path_factory.mktemp("twins") / "ft-a-copy"
    shutil.copytree(models_f32 / "ft-a", copy)
    return models_f32 / "ft-a", copy


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The folders the forward check runs."""
    seen: list[str] = []
    real = streamed.open_model

    def counted(folder, *args, **kwargs):
        seen.append(str(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(streamed, "open_model", counted)
    return seen


def test_different_inputs_are_not_run_after_a_merge(models_f32, tmp_path, opened):
    out = tmp_path / "out"
    spec = TWINS.format(a=models_f32 / "ft-a", b=models_f32 / "ft-b")
    result = run_merge(spec, out, progress=False)          # the default: validated, inputs only when needed
    forward = result.validation.check("forward")
    assert forward.status == "passed" and result.validation.status == "passed"
    assert opened == [str(out)]                              # the merged model only
    assert [entry["loss"] for entry in forward.numbers["inputs"]] == [None, None]
    assert all(entry["note"].startswith("not run: the inputs' weights differ") for entry in forward.numbers["inputs"])
    assert "2 input(s) not run: the inputs' weights differ" in forward.summary
    assert forward.numbers["compared_with"] is None
    # `merge validate` still computes their losses, as context
    opened.clear()
    again = validate(out, device="cpu").check("forward")
    assert len(opened) == 3 and all(entry["loss"] is not None for entry in again.numbers["inputs"])


def test_identical_inputs_run_one_reference(twins, tmp_path, opened):
    a, b = twins
    out = tmp_path / "out"
    run_merge(TWINS.format(a=a, b=b), out, progress=False, validate=False, max_shard_size="60kB")
    forward = validate(out, device="cpu", context_inputs=False).check("forward")
    assert forward.status == "passed" and forward.numbers["compared_with"] == str(a)
    assert opened == [str(out), str(a)]                      # one input: the copy is the same bytes
    first, second = forward.numbers["inputs"]
    assert first["loss"] is not None and second["loss"] is None
    assert second["note"] == f"not run: its weights are {a}'s, byte for byte, so it computes the same logits"

    info = read_output(str(out)).tensors["model.layers.1.input_layernorm.weight"]
    with open(info.path, "r+b") as f:                          # a norm weight of 3.0 instead of ~1.0
        f.seek(info.start)
        f.write(struct.pack("<f", 3.0) * 64)
    broken = validate(out, device="cpu", context_inputs=False).check("forward")
    assert broken.status == "failed"
    assert broken.failures[0].message.startswith(f"logits differ from {a}'s by up to ")


def test_same_weights_reads_the_files(twins, tmp_path):
    a, b = twins
    assert same_weights([str(a), str(b)]) is True
    assert same_weights([str(a), str(a)]) is True
    changed = tmp_path / "changed"
    shutil.copytree(b, changed)
    last = max(read_output(str(changed)).tensors.values(), key=lambda info: (info.path, info.start))
    with open(last.path, "r+b") as f:                          # the very last byte of the last tensor
        f.seek(last.start + last.nbytes - 1)
        byte = f.read(1)
        f.seek(last.start + last.nbytes - 1)
        f.write(bytes([byte[0] ^ 1]))
    assert same_weights([str(a), str(changed)]) is False


def test_reading_ahead_gives_the_same_logits(models_f32, monkeypatch):
    """The prefetching reader (used when it has a core of its own) feeds each module the same weights."""
    import torch

    from mergekit_lite.validation.inference import logits_of, make_batch

    folder = str(models_f32 / "ft-a")
    batch = make_batch(folder, 256)
    results = []
    for ahead in (False, True):
        monkeypatch.setattr(streamed, "reads_ahead", lambda device, ahead=ahead: ahead)
        model = streamed.streamed_model(folder, torch.device("cpu"))
        results.append(logits_of(model, batch, torch.device("cpu")))
        assert model.streaming.live == 0 and model.streaming.reads > 0
    assert torch.equal(results[0], results[1])
