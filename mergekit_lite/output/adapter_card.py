"""The model card (README.md) of an adapter made by combining LoRA adapters.

The front matter says what the Hub needs to show it as an adapter: ``library_name: peft``, the base model (a
Hub id only) and ``base_model_relation: adapter``. Names and paths are printed in code spans on one line.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from .. import __version__
from ..spec.references import REPO_ID


def adapter_card_text(name: str, base_model: Optional[str], adapters: list[tuple[str, float]], method: str,
                      rank: int, parameters: dict[str, Any], seed: Optional[int]) -> str:
    front: dict[str, Any] = {"library_name": "peft", "tags": ["lora", "mergekit-lite", "adapter-merge"]}
    if base_model and REPO_ID.match(base_model):
        front["base_model"] = base_model
        front["base_model_relation"] = "adapter"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {_code(name)}", "",
             f"A LoRA adapter (rank {rank}) combined by mergekit_lite {__version__} from these adapters with "
             f"peft's `add_weighted_adapter` arithmetic, combination type `{method}`:", ""]
    lines += [f"- {_code(label)} (weight {weight:g})" for label, weight in adapters]
    shown = {k: v for k, v in parameters.items() if v is not None}
    if shown:
        lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()) + "."]
    if seed is not None and method.startswith("dare"):
        lines += ["", f"Random masks (DARE) drawn with seed {seed}, one stream per module."]
    base = f" `{_one_line(base_model)}`" if base_model else ""
    lines += ["", f"Load it with `PeftModel.from_pretrained(base, path)` on the base model{base}, or fold it "
                  "with `merge fold BASE path -o OUT`.", ""]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _code(text: str) -> str:
    text = _one_line(text).replace("`", "'")
    return f"`{text}`"
