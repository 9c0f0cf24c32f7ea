"""Validation passes on correct outputs and each check fails, naming the tensor, on a deliberately broken one."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.models import read_folder
from helpers.validation_specs import DEVICES, LINEAR, PASSING, TASK_ARITHMETIC

from mergekit_lite import run_merge, validate
from mergekit_lite.safetensors_format import TensorInfo
from mergekit_lite.validation.folder import read_output
from mergekit_lite.validation.recompute import sample_jobs, ulp_distance

HAS_TRANSFORMERS = True
try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - a test extra
    HAS_TRANSFORMERS = False


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def merge(root: Path, template: str, out: Path, **kwargs) -> Path:
    run_merge(template.format(root=root), out, progress=False, validate=False, max_shard_size="60kB", **kwargs)
    return out


def tensor(out: Path, name: str) -> TensorInfo:
    return read_output(str(out)).tensors[name]


def poke(info: TensorInfo, element: int, data: bytes) -> None:
    """Overwrite the bytes of one element of a tensor in place, in its shard file."""
    with open(info.path, "r+b") as f:
        f.seek(info.start + element * info.nbytes // info.numel)
        f.write(data)


def statuses(report) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


# ---------------------------------------------------------------------------------------------------------
# Correct outputs pass


@pytest.mark.parametrize("case", list(PASSING))
def test_passes_on_correct_outputs(case, device, request, tmp_path):
    fixture, template, extra = PASSING[case]
    root = request.getfixturevalue(fixture)
    out = merge(root, template, tmp_path / "out", device=device, **extra)
    report = validate(out, device=device)
    assert report.status == ("passed" if HAS_TRANSFORMERS else "not_checked"), str(report)
    expected = "passed" if HAS_TRANSFORMERS else "not_checked"
    assert statuses(report) == {"structure": "passed", "finite": "passed", "recompute": "passed",
                                "forward": expected}
    written = read_folder(out)
    structure, finite, recompute = (report.check(n).numbers for n in ("structure", "finite", "recompute"))
    assert structure["tensors"] == structure["planned_tensors"] == len(written)
    assert structure["files"] == len([p for p in os.listdir(out) if p.endswith(".safetensors")]) > 1
    assert finite["values"] == sum(t.numel() for t in written.values()) and finite["nan"] == finite["inf"] == 0
    # The sample: everything outside the layers plus the first and last layer (4 layers: 2 of 4 x 9 tensors).
    outside = [n for n in written if ".layers." not in n]
    assert recompute["tensors"] == len(outside) + 2 * 9 and recompute["planned"] == len(written)
    assert recompute["bit_exact"] == recompute["tensors"] and recompute["tolerance_ulp"] == 0
    assert recompute["merged_on"] == device.split(":")[0] and recompute["max_ulp"] == 0.0


def test_full_recomputes_every_tensor(models_f32, tmp_path):
    out = merge(models_f32, TASK_ARITHMETIC, tmp_path / "out")
    report = validate(out, device="cpu", full=True, forward=False)
    numbers = report.check("recompute").numbers
    assert report.passed and numbers["full"] and numbers["tensors"] == numbers["planned"] == numbers["bit_exact"] == 39


def test_sample_always_has_embeddings_head_and_end_layers(models_f32):
    from mergekit_lite.plan.planner import make_plan

    merge_plan = make_plan(LINEAR.format(root=models_f32))
    try:
        names = {job.name for job in sample_jobs(merge_plan, full=False)}
    finally:
        merge_plan.close()
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"} <= names
    assert not any(".layers.1." in n or ".layers.2." in n for n in names)


# ---------------------------------------------------------------------------------------------------------
# Each check fails on a broken output, naming the tensor


def test_flipped_byte_is_caught_by_recompute(models_f32, tmp_path, device):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    info = tensor(out, name)
    element = 5 * 64 + 17                                    # position [5, 17] of a (64, 64) tensor
    with open(info.path, "rb") as f:
        f.seek(info.start + 4 * element)
        low = f.read(1)[0]
    poke(info, element, bytes([low ^ 0x01]))                 # the last mantissa bit: exactly one ulp
    report = validate(out, device=device, forward=False)
    assert statuses(report) == {"structure": "passed", "finite": "passed", "recompute": "failed",
                                "forward": "not_applicable"}
    failures = report.check("recompute").failures
    assert [(f.tensor, f.file) for f in failures] == [(name, os.path.basename(info.path))]
    assert failures[0].message == ("differs from the merge recomputed from the sources: 1 of 4096 values, up to "
                                   "1 ulp of float32 (tolerance 0) at [5, 17]")
    assert not report.passed


def test_flipped_byte_outside_the_sample_is_caught_with_full(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    name = "model.layers.2.mlp.up_proj.weight"
    poke(tensor(out, name), 0, b"\x00\x00\x00\x00")
    failures = validate(out, device="cpu", full=True, forward=False).check("recompute").failures
    assert [f.tensor for f in failures] == [name]
    assert failures[0].message.startswith("differs from the merge recomputed from the sources: 1 of 8192 values")


def test_nan_is_caught_by_finite(models_bf16, tmp_path, device):
    out = merge(models_bf16, TASK_ARITHMETIC, tmp_path / "out")
    name = "model.layers.2.mlp.down_proj.weight"              # (64, 128) bfloat16
    info = tensor(out, name)
    poke(info, 3 * 128 + 5, struct.pack("<H", 0x7FC0))      # a bfloat16 NaN at [3, 5]
    poke(info, 7 * 128 + 1, struct.pack("<H", 0xFF80))      # and -Inf at [7, 1]
    report = validate(out, device=device, forward=False)
    finite = report.check("finite")
    assert finite.status == "failed" and len(finite.failures) == 1
    assert str(finite.failures[0]) == (f"{os.path.basename(info.path)}: tensor '{name}': 1 NaN and 1 Inf, "
                                       "the first at [3, 5]")
    assert finite.numbers["nan"] == 1 and finite.numbers["inf"] == 1 and finite.numbers["tensors_nonfinite"] == 1
    assert statuses(report)["structure"] == "passed" and statuses(report)["recompute"] == "passed"  # not sampled


def test_nan_counted_by_the_forward_check_as_it_reads(models_bf16, tmp_path):
    """With the forward check on, the tensors it reads are counted there (finite reads only the others), and
    the counts, the tensor named and the first index are those of a scan of the files on its own."""
    from mergekit_lite.validation.finite import check_finite

    out = merge(models_bf16, TASK_ARITHMETIC, tmp_path / "out")
    name = "model.layers.2.mlp.down_proj.weight"              # (64, 128) bfloat16, run by the forward pass
    info = tensor(out, name)
    poke(info, 3 * 128 + 5, struct.pack("<H", 0x7FC0))      # a bfloat16 NaN at [3, 5]
    poke(info, 7 * 128 + 1, struct.pack("<H", 0xFF80))      # and -Inf at [7, 1]
    report = validate(out, device="cpu")
    finite = report.check("finite")
    alone = check_finite(read_output(str(out)), torch.device("cpu"))
    assert finite.numbers["tensors_counted_by_forward"] == finite.numbers["tensors"] == alone.numbers["tensors"]
    assert alone.numbers["tensors_counted_by_forward"] == 0
    assert [str(f) for f in finite.failures] == [str(f) for f in alone.failures] == [
        f"{os.path.basename(info.path)}: tensor '{name}': 1 NaN and 1 Inf, the first at [3, 5]"]
    assert {k: finite.numbers[k] for k in ("nan", "inf", "values")} == {k: alone.numbers[k] for k in
                                                                       ("nan", "inf", "values")}
    assert finite.numbers["nan"] == finite.numbers["inf"] == 1 and finite.status == "failed"
    # allowed: counted the same, and the forward check (its logits NaN) is not checked rather than passed
    allowed = validate(out, device="cpu", allow_nonfinite=True)
    assert statuses(allowed)["finite"] == "passed" and statuses(allowed)["forward"] == "not_checked"
    assert "2 NaN/Inf values (--allow-nonfinite)" in allowed.check("forward").summary


def test_nan_counted_by_the_forward_check_in_row_blocks(models_bf16, tmp_path, monkeypatch):
    """A tensor upcast for the forward pass is read a block of rows at a time (validation/stream.STAGING): with
    blocks of 7 rows, non-finite values in later blocks are counted once each, at their own index."""
    from mergekit_lite.validation import stream
    from mergekit_lite.validation.finite import check_finite

    out = merge(models_bf16, TASK_ARITHMETIC, tmp_path / "out")
    name = "model.embed_tokens.weight"                        # (256, 64) bfloat16: 128 bytes a row
    info = tensor(out, name)
    poke(info, 200 * 64 + 63, struct.pack("<H", 0x7F80))    # +Inf at [200, 63], block 28
    poke(info, 255 * 64 + 0, struct.pack("<H", 0x7FC0))     # NaN at [255, 0], the last block
    monkeypatch.setattr(stream, "STAGING", 7 * 128)
    finite = validate(out, device="cpu").check("finite")
    alone = check_finite(read_output(str(out)), torch.device("cpu"))
    assert finite.numbers["tensors_counted_by_forward"] == finite.numbers["tensors"]
    assert [str(f) for f in finite.failures] == [str(f) for f in alone.failures] == [
        f"{os.path.basename(info.path)}: tensor '{name}': 1 NaN and 1 Inf, the first at [200, 63]"]
    assert (finite.numbers["nan"], finite.numbers["inf"], finite.numbers["values"]) == (
        1, 1, alone.numbers["values"])


def test_finite_chunks_do_not_change_the_answer(models_f32, tmp_path):
    """Chunks far smaller than a tensor (so its values straddle chunk edges) give the same counts and index."""
    from mergekit_lite.validation.finite import check_finite

    out = merge(models_f32, LINEAR, tmp_path / "out")
    name = "model.embed_tokens.weight"                        # (256, 64) float32
    poke(tensor(out, name), 200 * 64 + 63, struct.pack("<f", float("inf")))
    poke(tensor(out, name), 255 * 64 + 0, struct.pack("<f", float("nan")))
    for chunk_bytes in (12, 4096, 1 << 26):
        result = check_finite(read_output(str(out)), torch.device("cpu"), chunk_bytes=chunk_bytes)
        assert [str(f).split(": ", 1)[1] for f in result.failures] == [
            f"tensor '{name}': 1 NaN and 1 Inf, the first at [200, 63]"]


def test_tensor_missing_from_the_index(models_f32, tmp_path, device):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    name = "model.layers.1.mlp.gate_proj.weight"
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(name)
    index["metadata"]["total_size"] -= 128 * 64 * 4
    index_path.write_text(json.dumps(index))
    report = validate(out, device=device, forward=False)
    assert [str(f) for f in report.check("structure").failures] == [
        f"{shard}: tensor '{name}': is stored here but missing from the index"]
    assert not report.passed


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("corrupt, expected", [
    (lambda index, lm: index["weight_map"].update({"model.extra.weight": lm}),
     INDEX + ": tensor 'model.extra.weight': the index puts it in {lm}, which does not hold it"),
    (lambda index, lm: index["weight_map"].update({"model.norm.weight": "model-00099-of-00099.safetensors"}),
     INDEX + ": the index names shard 'model-00099-of-00099.safetensors', which does not exist"),
    (lambda index, lm: index["weight_map"].update({"model.norm.weight": "../base/model.safetensors"}),
     INDEX + ": the index names shard '../base/model.safetensors', which is not a file in this folder"),
    (lambda index, lm: index["metadata"].update(total_size=7),
     INDEX + ": metadata.total_size is 7 but the indexed tensors hold 723200 bytes"),
])
def test_index_inconsistencies(models_f32, tmp_path, corrupt, expected):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    index_path = out / INDEX
    index = json.loads(index_path.read_text())
    lm = index["weight_map"]["lm_head.weight"]
    corrupt(index, lm)
    index_path.write_text(json.dumps(index))
    failures = [str(f) for f in validate(out, device="cpu", forward=False).check("structure").failures]
    assert failures[0] == expected.format(lm=lm)


def test_duplicated_tensor_and_truncated_shard(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    index_path = out / "model.safetensors.index.json"
    text = index_path.read_text()
    # A JSON object with a key twice: json.load would silently keep the last one.
    index_path.write_text(text.replace('"weight_map": {', '"weight_map": {\n    "model.norm.weight": "x",', 1))
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    victim = out / shards[1]
    victim.write_bytes(victim.read_bytes()[:-10])
    failures = [str(f) for f in validate(out, device="cpu", forward=False).check("structure").failures]
    assert "model.safetensors.index.json: tensor 'model.norm.weight': is listed twice in the index" in failures
    size = victim.stat().st_size
    assert any(f.startswith(f"{shards[1]}: tensor '") and
               f.endswith(f"end 10 bytes beyond the end of the file ({size} bytes) (the file is truncated; download it "
                          "again)") for f in failures), failures[:1]


def test_shape_contradicting_config(models_f32, tmp_path, device):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 96                         # the tensors say 128
    config_path.write_text(json.dumps(config))
    report = validate(out, device=device)
    failures = [str(f) for f in report.check("structure").failures]
    up = "model.layers.3.mlp.up_proj.weight"
    assert f"{os.path.basename(tensor(out, up).path)}: tensor '{up}': shape [128, 64] contradicts config.json " \
           "(hidden_size 64, intermediate_size 96: [96, 64])" in failures
    assert "config.json: intermediate_size is 96, the spec's merge gives 128" in failures
    assert len(failures) == 1 + 3 * 4                         # gate, up and down in each of 4 layers
    if HAS_TRANSFORMERS:   # transformers builds the MLP from config.json, so it cannot take these tensors
        forward = report.check("forward").failures
        assert [str(f) for f in forward] == [
            "tensor 'model.layers.0.mlp.down_proj.weight': has shape [64, 128] in the files, the model built from "
            "config.json needs [64, 96] (11 more tensors too): transformers would initialise it randomly"]


def test_layer_count_and_head_count_contradicting_config(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_hidden_layers=6, num_key_value_heads=4)
    config_path.write_text(json.dumps(config))
    report = validate(out, device="cpu")
    failures = [str(f) for f in report.check("structure").failures]
    assert "config.json: num_hidden_layers is 6 but the output has no tensors for layer(s) 4-5" in failures
    k = "model.layers.0.self_attn.k_proj.weight"
    assert f"{os.path.basename(tensor(out, k).path)}: tensor '{k}': shape [32, 64] contradicts config.json " \
           "(hidden_size 64, num_attention_heads 4, num_key_value_heads 4, head_dim 16: [64, 64])" in failures
    if HAS_TRANSFORMERS:   # 2 layers x 9 tensors missing, k_proj and v_proj of 4 layers the wrong shape
        forward = report.check("forward").failures
        assert [str(f) for f in forward] == [
            "tensor 'model.layers.4.input_layernorm.weight': is missing (25 more tensors too): transformers would "
            "initialise it randomly"]


def test_wrong_models_tensor_is_caught_by_recompute(models_f32, tmp_path, device):
    import numpy as np

    out = merge(models_f32, LINEAR, tmp_path / "out")
    name = "lm_head.weight"                                   # (256, 64) float32
    merged = read_folder(out)[name].numpy().copy()
    theirs = read_folder(models_f32 / "ft-a")[name].numpy().copy()
    poke(tensor(out, name), 0, theirs.tobytes())
    report = validate(out, device=device, forward=False)
    failures = report.check("recompute").failures
    assert [f.tensor for f in failures] == [name]
    # Independently: ulps with numpy's spacing (the gap to the next float32) at the larger magnitude.
    ulps = np.abs(merged.astype(np.float64) - theirs) / np.spacing(np.maximum(np.abs(merged), np.abs(theirs)))
    worst = [int(i) for i in np.unravel_index(int(np.argmax(ulps)), merged.shape)]
    assert failures[0].message == (
        f"differs from the merge recomputed from the sources: {int((merged != theirs).sum())} of 16384 values, "
        f"up to {ulps.max():.3g} ulp of float32 (tolerance 0) at {worst}; it is {models_f32}/ft-a's tensor, unmerged")
    assert statuses(report)["structure"] == statuses(report)["finite"] == "passed"


def test_a_tied_lm_head_that_differs_from_the_embeddings(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    config_path = out / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tie_word_embeddings": True}))
    failures = [str(f) for f in validate(out, device="cpu", forward=False).check("structure").failures]
    assert ("config.json: tensor 'lm_head.weight': differs from the input embeddings, but config.json says "
            "tie_word_embeddings: true, so transformers replaces it with them on load") in failures


# ---------------------------------------------------------------------------------------------------------
# The tolerance rule, the recorded run settings, and outputs without a spec


def test_ulp_distance():
    one = torch.tensor([1.0])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        up = torch.nextafter(one.to(dtype).float(), torch.tensor([2.0])).to(dtype) if dtype == torch.float32 else \
            (one + torch.finfo(dtype).eps).to(dtype)
        assert float(ulp_distance(one.to(dtype), up)) == 1.0
        assert float(ulp_distance(up, one.to(dtype))) == 1.0
    below = torch.tensor([1.0 - 2 ** -24])    # the float just below 1: ulps are counted at the larger magnitude
    assert float(ulp_distance(below, one)) == 0.5
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([nan, nan, 0.0, inf, -inf, 0.0])
    b = torch.tensor([nan, 1.0, 2 ** -149, inf, inf, -0.0])
    assert ulp_distance(a, b).tolist() == [0.0, inf, 1.0, 0.0, inf, 0.0]


def test_across_device_types_one_ulp_is_tolerated(models_f32, tmp_path):
    """Merged on one device type, validated on another: 1 ulp of the output dtype passes, 2 do not."""
    out = merge(models_f32, LINEAR, tmp_path / "out")
    settings_path = out / "merge_run.json"
    settings_path.write_text(json.dumps({**json.loads(settings_path.read_text()), "device": "cuda"}))
    name = "model.embed_tokens.weight"
    info = tensor(out, name)
    value = read_folder(out)[name].flatten()[10:12]
    poke(info, 10, torch.nextafter(value[:1], torch.tensor([10.0])).numpy().tobytes())
    report = validate(out, device="cpu", forward=False)
    numbers = report.check("recompute").numbers
    assert report.passed and numbers["tolerance_ulp"] == 1 and numbers["max_ulp"] == 1.0
    assert numbers["bit_exact"] == numbers["tensors"] - 1
    two_up = torch.nextafter(torch.nextafter(value[1:], torch.tensor([10.0])), torch.tensor([10.0]))
    poke(info, 11, two_up.numpy().tobytes())
    failures = validate(out, device="cpu", forward=False).check("recompute").failures
    assert [f.tensor for f in failures] == [name] and "up to 2 ulp of float32 (tolerance 1) at [0, 11]" in \
        failures[0].message


def test_run_settings_are_what_recompute_uses(models_f32, tmp_path):
    """--out-dtype and --dtype are not in mergekit_config.yml; merge_run.json records them."""
    out = merge(models_f32, TASK_ARITHMETIC, tmp_path / "out", dtype="bfloat16", out_dtype="float16", seed=5)
    assert json.loads((out / "merge_run.json").read_text()) == {
        "dtype": "bfloat16", "out_dtype": "float16", "seed": 5, "device": "cpu", "tool": "mergekit_lite",
        "version": "0.1.0", "working_dir": os.getcwd(), "config_from": None, "stage": None}
    assert validate(out, device="cpu", forward=False).passed
    os.remove(out / "merge_run.json")                        # without them the spec plans float32 tensors
    failures = validate(out, device="cpu", forward=False).check("structure").failures
    assert str(failures[0]) == (f"{os.path.basename(tensor(out, failures[0].tensor).path)}: tensor "
                                f"'{failures[0].tensor}': dtype float16 != float32 planned from the spec")


def test_corrupt_run_settings_are_a_finding(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    (out / "merge_run.json").write_text('{"seed": "five"}')
    failures = [str(f) for f in validate(out, device="cpu", forward=False).check("structure").failures]
    assert failures == ["merge_run.json: cannot read the run settings: seed 'five' is not an integer"]


def test_without_a_spec_recompute_is_not_checked_and_spec_can_be_given(models_f32, tmp_path):
    out = merge(models_f32, LINEAR, tmp_path / "out")
    spec_text = (out / "mergekit_config.yml").read_text()
    os.remove(out / "mergekit_config.yml")
    report = validate(out, device="cpu", forward=False)
    assert report.status == "not_checked" and report.spec is None
    recompute = report.check("recompute")
    assert recompute.status == "not_checked"
    assert recompute.summary == "the output has no mergekit_config.yml; pass the spec it was merged from (--spec)"
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    given = validate(out, spec=spec, device="cpu", forward=False)
    assert given.spec == str(spec) and given.check("recompute").numbers["bit_exact"] == 21


def test_missing_sources_leave_recompute_not_checked_with_the_reason(models_f32, tmp_path):
    shutil.copytree(models_f32, tmp_path / "models")
    out = merge(tmp_path / "models", LINEAR, tmp_path / "out")
    shutil.rmtree(tmp_path / "models" / "ft-b")
    report = validate(out, device="cpu", forward=False)
    assert report.status == "not_checked" and report.check("recompute").status == "not_checked"
    assert report.check("recompute").summary == (
        f"cannot plan the merge from the spec (models[1].model: model folder '{tmp_path}/models/ft-b' not found)")


def test_a_source_changed_since_the_merge(models_f32, tmp_path):
    shutil.copytree(models_f32, tmp_path / "models")
    out = merge(tmp_path / "models", LINEAR, tmp_path / "out")
    shutil.rmtree(tmp_path / "models" / "ft-c")
    shutil.copytree(models_f32 / "ft-a", tmp_path / "models" / "ft-c")
    failures = validate(out, device="cpu", forward=False).check("recompute").failures
    assert len(failures) == 21 and all(f.message.startswith("differs from the merge recomputed") for f in failures)


def test_validates_a_mergekit_output(models_f32, tmp_path):
    """An output mergekit wrote (no merge_run.json) validates too, with the 1-ulp cross-tool tolerance."""
    from helpers.mergekit_oracle import run_mergekit

    spec = LINEAR.format(root=models_f32)
    out = run_mergekit(spec, tmp_path / "mergekit")
    (out / "mergekit_config.yml").write_text(spec)
    report = validate(out, device="cpu")
    assert report.passed, str(report)
    assert report.check("recompute").numbers["tolerance_ulp"] == 1
    assert report.check("recompute").numbers["merged_on"] is None


def test_not_a_folder_is_an_error(tmp_path):
    from mergekit_lite.errors import ModelError

    with pytest.raises(ModelError, match="output folder not found"):
        validate(tmp_path / "nope")


def test_stray_shards_are_reported(models_f32, tmp_path):
    out = tmp_path / "out"
    run_merge(LINEAR.format(root=models_f32), out, progress=False, validate=False)   # one model.safetensors
    shutil.copy(out / "model.safetensors", out / "model-00001-of-00002.safetensors")
    failures = [str(f) for f in validate(out, device="cpu", forward=False).check("structure").failures]
    assert failures == ["model-00001-of-00002.safetensors: is not read by loaders: without an index only "
                        "model.safetensors is"]


@pytest.mark.parametrize("size", [0, 1, 7, 8, 13, 4096, 4099])
@pytest.mark.parametrize("start", [0, 1, 2, 4, 8])   # byte offsets of the views: words of 8, 4, 2 or 1 bytes
def test_same_bytes_finds_every_differing_byte(size, start):
    """The validation's byte comparison (compared as wide words where the count and starts allow) is a byte
    comparison: any one byte changed, at any position and alignment, makes two tensors differ."""
    from mergekit_lite.safetensors_format import same_bytes

    data = torch.randint(0, 256, (start + size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    a, b = data[start:], data.clone()[start:]
    assert same_bytes(a, b)
    for at in {0, size // 2, size - 1} if size else ():
        changed = b.clone()
        changed[at] ^= 1
        assert not same_bytes(a, changed) and not same_bytes(changed, a)
    if size:
        assert not same_bytes(a[:-1], b)                                     # another length: never the same
    assert same_bytes(torch.tensor([1.0, -0.0]), torch.tensor([1.0, -0.0]))
    assert not same_bytes(torch.tensor([0.0]), torch.tensor([-0.0]))        # equal values, other bytes
