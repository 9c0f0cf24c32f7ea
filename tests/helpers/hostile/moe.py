"""Hostile inputs: mergekit-moe files given to `merge moe`."""

from __future__ import annotations

import json
from pathlib import Path

from .catalogue import Models, Scenario, case


def moe_case(tmp: Path, text: str) -> tuple[list[str], Path]:
    path = tmp / "moe.yml"
    path.write_text(text)
    return ["moe", str(path), "-o", str(tmp / "out"), "--no-validate", "--quiet"], path


def expert(model: Path, prompts: str = '["x"]') -> str:
    return f"  - source_model: {model}\n    positive_prompts: {prompts}\n"


@case("moe")
def moe_prompts_not_strings(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\nexperts:\n" + expert(models.b, "[1, 2]") + expert(models.a))
    return Scenario(args, 2, f"error: {path}: experts[0].positive_prompts: expected a list of strings\n"
                             "Hint: quote prompts that YAML would read as numbers, booleans or mappings\n",
                    out=tmp / "out")


@case("moe")
def moe_expert_of_another_architecture(tmp: Path, models: Models) -> Scenario:
    other = models.copy(models.b, tmp / "other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "qwen2"
    (other / "config.json").write_text(json.dumps(config))
    args, _ = moe_case(tmp, f"base_model: {models.a}\ngate_mode: random\nexperts:\n" + expert(models.b)
                       + expert(other))
    return Scenario(args, 1, f"error: {other}: experts[1]: model_type 'qwen2' != base model's 'llama'\n"
                             "Hint: every expert must have the base model's architecture\n", out=tmp / "out")


@case("moe")
def moe_zero_experts(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\ngate_mode: random\nexperts: []\n")
    return Scenario(args, 2, f"error: {path}: experts: expected a non-empty list of experts\n"
                             "Hint: each expert: {source_model: ..., positive_prompts: [...]}\n", out=tmp / "out")


@case("moe")
def moe_more_experts_per_token_than_experts(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\ngate_mode: random\nexperts_per_token: 3\nexperts:\n"
                          + expert(models.b) + expert(models.a))
    return Scenario(args, 2, f"error: {path}: experts_per_token: experts_per_token must be an integer from 1 to the "
                             "number of experts (2), got 3\n", out=tmp / "out")


@case("moe")
def moe_unknown_gate_mode(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\ngate_mode: hiden\nexperts:\n" + expert(models.b)
                          + expert(models.a))
    return Scenario(args, 2, f"error: {path}: gate_mode: unknown gate_mode 'hiden'. Did you mean 'hidden'?\n"
                             "Hint: one of: hidden, cheap_embed, random, uniform_random\n", out=tmp / "out")


@case("moe")
def moe_missing_base_model(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, "gate_mode: random\nexperts:\n" + expert(models.b) + expert(models.a))
    return Scenario(args, 2, f"error: {path}: base_model: base_model is missing\n"
                             "Hint: a MoE merge starts from base_model: <folder or org/name>\n", out=tmp / "out")


@case("moe")
def moe_misspelled_key(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\nexpert_per_token: 1\nexperts:\n" + expert(models.b)
                          + expert(models.a))
    return Scenario(args, 2, f"error: {path}: expert_per_token: unknown key. Did you mean 'experts_per_token'?\n"
                             "Hint: allowed here: base_model, experts, gate_mode, dtype, experts_per_token, "
                             "shared_experts, architecture, name\n"   # the experts' prompts are also the same:
                             f"(1 more problem found; `merge check {path}` lists every one)\n", out=tmp / "out")


@case("moe")
def moe_deepseek_output(tmp: Path, models: Models) -> Scenario:
    args, path = moe_case(tmp, f"base_model: {models.a}\ngate_mode: random\narchitecture: deepseek\nexperts:\n"
                          + expert(models.b) + expert(models.a))
    return Scenario(args, 2, f"error: {path}: architecture: DeepSeek MoE output is not supported: it needs "
                             "DeepSeek's own modelling code (trust_remote_code), which merge moe does not write\n"
                             "Hint: use architecture: mixtral (Llama/Mistral experts), qwen (with one shared expert) "
                             "or qwen3 (Qwen3 experts)\n", out=tmp / "out")
