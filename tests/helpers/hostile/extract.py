"""Hostile inputs: `merge extract` (LoRA extraction) given models that do not pair, bad settings, or an output
in the way. Every refusal comes before anything is written (or, for a change of rank 0, leaves nothing)."""


from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergekit_lite.testing.synthetic import LlamaShape, write_model

from .catalogue import Models, Scenario, case

SAME_BASE = "Hint: give the base model this fine-tune was trained from (same architecture and tensor names)\n"
GROUP = "lora extract"


def extract(tmp: Path, model: Path | str, base: Path | str, *extra: str, out: Path | None = None) -> list[str]:
    return ["extract", "--model", str(model), "--base-model", str(base), "-o", str(out or tmp / "out"), "-q", *extra]


@case(GROUP)
def extract_base_of_other_shapes(tmp: Path, models: Models) -> Scenario:
    wide = tmp / "wide"
    write_model(str(wide), LlamaShape(hidden=24, intermediate=32, layers=2, heads=2, kv_heads=1, vocab=32), seed=0)
    return Scenario(extract(tmp, models.a, wide), 1,
                    f"error: {models.a}: tensor 'model.embed_tokens.weight': shape [32, 16] != base [32, 24]\n"
                    + SAME_BASE)


@case(GROUP)
def extract_base_of_another_architecture(tmp: Path, models: Models) -> Scenario:
    other = models.copy(models.b, tmp / "mistral")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    return Scenario(extract(tmp, models.a, other), 1,
                    f"error: {models.a}: the fine-tuned model is LlamaForCausalLM but the base is MistralForCausalLM\n"
                    + SAME_BASE)


@case(GROUP)
def extract_base_missing_a_tensor(tmp: Path, models: Models) -> Scenario:
    from safetensors.torch import load_file, save_file

    base = models.copy(models.b, tmp / "base")
    tensors = load_file(str(base / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return Scenario(extract(tmp, models.a, base), 1,
                    f"error: {base}: tensor 'model.layers.1.mlp.up_proj.weight' is in the fine-tuned model but not "
                    "in the base\n" + SAME_BASE)


@case(GROUP)
def extract_missing_base(tmp: Path, models: Models) -> Scenario:
    """As a missing folder in a `merge run` spec: a usage error naming the option, before any Hub request."""
    return Scenario(extract(tmp, models.a, tmp / "nowhere"), 2,
                    f"error: --base-model: model folder '{tmp / 'nowhere'}' not found\n"
                    "Hint: check the path (relative paths are relative to the current directory)\n")


@case(GROUP)
def extract_two_revisions(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, "org/ft@v1@v2", models.b), 2,
                    "error: --model: 'org/ft@v1@v2' has more than one '@'\n"
                    "Hint: write org/name@revision with a single revision\n")


@case(GROUP)
def extract_revision_of_a_missing_folder(tmp: Path, models: Models) -> Scenario:
    """'@main' after a path that is no Hub repo id: never sent to the Hub."""
    return Scenario(extract(tmp, models.a, "./models/base@main"), 2,
                    "error: --base-model: no local folder './models/base@main', and './models/base' is not a Hub "
                    "repo id, so '@main' cannot be its revision\nHint: check the path (relative paths are relative "
                    "to the current directory); a revision is only for Hub repos: org/name@revision\n")


@case(GROUP)
def extract_from_base_plus_adapter(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, "org/ft+org/adapter", models.b), 2,
                    "error: --model: 'org/ft+org/adapter' is a base+adapter reference; extraction takes two whole "
                    "models\nHint: fold it first (`merge fold org/ft org/adapter -o FOLDER`), then give FOLDER\n")


@case(GROUP)
def extract_max_rank_zero(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, models.a, models.b, "--max-rank", "0"), 2,
                    "error: --max-rank: 0 is not a rank; give a whole number of 1 or more\n"
                    "Hint: see merge extract --help\n")


@case(GROUP)
def extract_negative_sv_epsilon(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, models.a, models.b, "--sv-epsilon", "-1"), 2,
                    "error: --sv-epsilon: -1.0 is not a threshold; give 0 (keep max-rank) or a positive number\n"
                    "Hint: see merge extract --help\n")


@case(GROUP)
def extract_unknown_out_dtype(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, models.a, models.b, "--out-dtype", "double-ish"), 2,
                    "error: --out-dtype: unknown dtype 'double-ish'; use one of bfloat16, float16, float32, float64\n"
                    "Hint: float32 keeps the factors exact; the default is the model's dtype\n")


@case(GROUP)
def extract_bad_regex(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, models.a, models.b, "-e", "("), 2,
                    "error: --exclude-regex: '(' is not a regular expression: missing ), unterminated subpattern at "
                    "position 0\nHint: it is matched (re.search) against module names like "
                    "model.layers.0.mlp.up_proj\n")


@case(GROUP)
def extract_same_folder_twice(tmp: Path, models: Models) -> Scenario:
    return Scenario(extract(tmp, models.a, models.a), 2,
                    "error: --base-model: --model and --base-model are the same folder, so there is no change to "
                    "extract\nHint: give the base model the fine-tune was trained from\n")


@case(GROUP)
def extract_no_change(tmp: Path, models: Models) -> Scenario:
    copy = models.copy(models.a, tmp / "copy")
    return Scenario(extract(tmp, models.a, copy), 2,
                    "error: --model: the fine-tuned model does not differ from the base in any module selected "
                    "(every change has rank 0)\nHint: check that --model and --base-model are the right folders, "
                    "or lower --sv-epsilon\n", out=tmp / "out")


@case(GROUP)
def extract_output_inside_an_input(tmp: Path, models: Models) -> Scenario:
    model = models.copy(models.a, tmp / "ft")
    out = model / "adapter"
    return Scenario(extract(tmp, model, models.b, out=out), 2,
                    f"error: {out}: the output folder is inside input model folder {model}\n"
                    "Hint: write the merged model somewhere else: inputs are never written to\n", preserved=(model,))


@case(GROUP)
def extract_over_the_users_folder(tmp: Path, models: Models) -> Scenario:
    mine = tmp / "mywork"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\chapter{Results}\n")
    return Scenario(extract(tmp, models.a, models.b, "--overwrite", out=mine), 2,
                    f"error: {mine}: this folder was not written by a merge (it has no merge_run.json; found "
                    "thesis.tex), so a merge never replaces it\nHint: choose another output path with -o, or move "
                    "your files out of the folder first (--overwrite replaces only the output of an earlier merge, "
                    "or an empty folder)\n", preserved=(mine,))


@case(GROUP)
def extract_no_output_given(tmp: Path, models: Models) -> Scenario:
    shutil.rmtree(tmp / "out", ignore_errors=True)
    return Scenario(["extract", "--model", str(models.a), "--base-model", str(models.b), "-q"], 2,
                    "error: OUT: no output folder given\nHint: `merge extract --model FT --base-model BASE OUT` or "
                    "`merge extract --model FT --base-model BASE -o OUT`\n")
