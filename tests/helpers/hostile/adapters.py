"""Hostile inputs: combining LoRA adapters (merge adapters)."""

from __future__ import annotations

from pathlib import Path

from .catalogue import TINY, Models, Scenario, case


def two_adapters(tmp: Path, base_a: str = "org/base", base_b: str = "org/base") -> tuple[Path, Path]:
    from mergekit_lite.testing.adapters import write_adapter

    return (Path(write_adapter(str(tmp / "one"), TINY, seed=1, base_model=base_a)),
            Path(write_adapter(str(tmp / "two"), TINY, seed=2, base_model=base_b)))


def combine(tmp: Path, *args: object) -> list[str]:
    return ["adapters", *map(str, args), "-o", str(tmp / "out"), "--quiet"]


@case("adapter merge")
def adapters_of_different_bases(tmp: Path, models: Models) -> Scenario:
    one, two = two_adapters(tmp, "org/base", "org/other-base")
    return Scenario(combine(tmp, one, two, "--method", "cat"), 1,
                    f"error: the adapters were made for different base models: {one} for 'org/base', {two} for "
                    "'org/other-base'\nHint: combine adapters of one base; if these bases are the same model under "
                    "two names (same shapes), pass --no-check-base\n", out=tmp / "out")


@case("adapter merge")
def adapter_merge_weights_count_mismatch(tmp: Path, models: Models) -> Scenario:
    one, two = two_adapters(tmp)
    return Scenario(combine(tmp, one, two, "--method", "linear", "--weights", "0.5,0.3,0.2"), 2,
                    "error: --weights: 3 weight(s) for 2 adapter(s)\nHint: give one weight per adapter, in the same "
                    "order (e.g. --weights 0.7,0.3), or none\n", out=tmp / "out")


@case("adapter merge")
def adapter_merge_density_out_of_range(tmp: Path, models: Models) -> Scenario:
    one, two = two_adapters(tmp)
    return Scenario(combine(tmp, one, two, "--method", "ties", "--density", "0"), 2,
                    "error: --density: density 0 is outside (0, 1]\nHint: the fraction of entries kept: 1 keeps all, "
                    "0.2 keeps a fifth\n", out=tmp / "out")


@case("adapter merge")
def adapter_merge_full_model_given(tmp: Path, models: Models) -> Scenario:
    one, _ = two_adapters(tmp)
    return Scenario(combine(tmp, one, models.a, "--method", "cat"), 1,
                    f"error: {models.a}: this is a full model (it has config.json and no adapter_config.json), not a "
                    "LoRA adapter\nHint: give PEFT adapter folders; to make an adapter from a fine-tuned model, use "
                    "`merge extract`; to merge full models, `merge run`\n", out=tmp / "out")


@case("adapter merge")
def adapter_merge_unknown_method(tmp: Path, models: Models) -> Scenario:
    one, two = two_adapters(tmp)
    return Scenario(combine(tmp, one, two, "--method", "dare_tie"), 2,
                    "error: --method: unknown combination type 'dare_tie'. Did you mean 'dare_ties'?\nHint: one of "
                    "cat, linear, ties, dare_linear, dare_ties, magnitude_prune, svd, ties_svd, dare_linear_svd, "
                    "dare_ties_svd, magnitude_prune_svd\n", out=tmp / "out")


@case("adapter merge")
def adapter_merge_ranks_differ_for_linear(tmp: Path, models: Models) -> Scenario:
    from mergekit_lite.testing.adapters import AdapterShape, write_adapter

    one, _ = two_adapters(tmp)
    four = write_adapter(str(tmp / "four"), TINY, AdapterShape(r=4, lora_alpha=8), seed=3, base_model="org/base")
    return Scenario(combine(tmp, one, four, "--method", "linear"), 1,
                    f"error: linear combines the factors entry by entry, so all adapters need the same rank ({one} "
                    f"r=8, {four} r=4)\nHint: use cat (exact, rank = sum) or svd (--rank R) for adapters of different "
                    "ranks\n", out=tmp / "out")
