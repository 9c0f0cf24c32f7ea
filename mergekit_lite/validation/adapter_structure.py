"""Check 1 for an adapter folder, structure: what PEFT needs to load it, from the config and headers only.

- adapter_config.json: ``peft_type`` LORA, a positive int ``r``, a finite ``lora_alpha``, ``target_modules``
  given, every ``rank_pattern`` / ``alpha_pattern`` key matching an adapted module;
- every module has its A/B pair (lora_A/lora_B or lora_embedding_A/B) with the rank its config gives it (``r`` or
  its rank_pattern entry) on both sides, and is one ``target_modules`` names; DoRA magnitudes and lora_B biases
  only when the config enables them;
- the whole tensors (modules_to_save) are of modules the config lists, and every listed module has one;
- no key PEFT would not load (lora/adapter.py refuses them when it reads the file);
- with a local base model (the config's ``base_model_name_or_path`` when it is a folder, else the source
  recorded by `merge extract`): each module's A/B shapes against the base weight's, from its headers.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from ..architecture import INPUT_EMBEDDINGS, OUTPUT_EMBEDDING
from ..errors import ModelError
from ..safetensors_format import read_header
from ..sources.user_files import read_json_object
from .folder import OutputFolder
from .report import CheckResult, Finding, outcome

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_adapter_folder(path: str) -> tuple[Optional[OutputFolder], Optional[str]]:
    """The adapter file's header as an OutputFolder (for the finite check), or (None, why it cannot be read)."""
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        return None, f"no {WEIGHTS} in the adapter folder"
    try:
        tensors, _ = read_header(weights)
    except ModelError as exc:
        return None, exc.what
    return OutputFolder(path, {WEIGHTS: tensors}, dict(tensors), {}), None


def check_adapter_structure(path: str, folder: Optional[OutputFolder], problem: Optional[str],
                            record: Optional[dict]) -> CheckResult:
    from ..lora.adapter import open_adapter

    started = time.perf_counter()
    numbers: dict[str, Any] = {"modules": 0, "tensors": 0, "saved": 0, "base": None}
    if folder is None:
        return outcome("structure", [Finding(problem or "unreadable", file=WEIGHTS)], "", numbers, 0.0)
    numbers["tensors"] = len(folder.tensors)
    try:
        raw = read_json_object(os.path.join(path, CONFIG), CONFIG, CONFIG, "fix or rewrite the file")
        adapter = open_adapter(path, path)
    except ModelError as exc:
        return outcome("structure", [Finding(exc.what, tensor=_tensor_of(exc.what), file=exc.file and
                                             os.path.basename(exc.file))], "", numbers,
                       time.perf_counter() - started)
    try:
        failures = _config_fields(raw) + _pairs(adapter) + _patterns(adapter) + _saved(adapter, raw)
        base_note, against = _against_base(adapter, raw, record, numbers)
        failures += against
    finally:
        adapter.close()
    numbers.update(modules=len(adapter.modules), saved=len(adapter.replacements))
    saved = f", {numbers['saved']} tensor(s) saved whole" if numbers["saved"] else ""
    summary = f"{numbers['modules']} LoRA modules (A/B pairs, ranks, config){saved}; {base_note}"
    return outcome("structure", failures, summary, numbers, time.perf_counter() - started)


def _tensor_of(what: str) -> Optional[str]:
    return what.split("'")[1] if what.count("'") >= 2 else None


def _config_fields(raw: dict) -> list[Finding]:
    found = []
    if raw.get("peft_type") != "LORA":
        found.append(f"peft_type is {raw.get('peft_type')!r}, not 'LORA'")
    if type(raw.get("r")) is not int or raw["r"] < 1:
        found.append(f"r is {raw.get('r')!r}, not a positive whole number")
    if type(raw.get("lora_alpha")) not in (int, float):
        found.append(f"lora_alpha is {raw.get('lora_alpha')!r}, not a number")
    if not raw.get("target_modules"):
        found.append("target_modules is missing: PEFT would not know which modules to adapt")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(raw.get(name) or {}, dict):
            found.append(f"{name} is not a map of module -> value")
    return [Finding(message, file=CONFIG) for message in found]


def _pairs(adapter) -> list[Finding]:
    found = []
    settings = adapter.settings
    for name, module in adapter.modules.items():
        down, up = adapter.info(module.down).shape, adapter.info(module.up).shape
        rank = settings.rank(name)
        if down[0] != rank or up[1] != rank:
            found.append(Finding(f"rank {down[0]} (A) / {up[1]} (B), but the config gives module '{name}' rank {rank}",
                                 tensor=module.down, file=WEIGHTS))
        if not _targeted(settings.target_modules, name):
            found.append(Finding(f"module '{name}' is not one target_modules names, so PEFT would not load it",
                                 tensor=module.down, file=WEIGHTS))
        if module.magnitude and not settings.use_dora:
            found.append(Finding("a DoRA magnitude, but use_dora is false", tensor=module.magnitude, file=WEIGHTS))
        if module.up_bias and not settings.lora_bias:
            found.append(Finding("a lora_B bias, but lora_bias is false", tensor=module.up_bias, file=WEIGHTS))
    return found


def _targeted(targets: Any, module: str) -> bool:
    if targets is None:
        return False
    if hasattr(targets, "fullmatch"):
        return bool(targets.fullmatch(module))
    return any(module == t or module.endswith("." + t) for t in targets)


def _patterns(adapter) -> list[Finding]:
    found = []
    for field_name, patterns in adapter.settings.keys.items():
        for key, pattern in patterns.items():
            if not any(pattern.match(module) for module in adapter.modules):
                found.append(Finding(f"{field_name} key '{key}' matches no adapted module", file=CONFIG))
    return found


def _saved(adapter, raw: dict) -> list[Finding]:
    listed = raw.get("modules_to_save") or []
    found = []
    for target, key in adapter.replacements.items():
        module = target.rpartition(".")[0]
        if not any(module == m or module.endswith("." + m) for m in listed):
            found.append(Finding(f"a whole tensor of '{module}', which modules_to_save does not list (a stray key)",
                                 tensor=key, file=WEIGHTS))
    for m in listed:
        if not any(t.rpartition(".")[0] == m or t.rpartition(".")[0].endswith("." + m) for t in adapter.replacements):
            found.append(Finding(f"modules_to_save lists '{m}', but the file holds no tensor of it", file=CONFIG))
    return found


def _against_base(adapter, raw: dict, record: Optional[dict], numbers: dict) -> tuple[str, list[Finding]]:
    """(what the summary says about the base, findings) for the A/B and whole-tensor shapes against the base."""
    from ..sources.opener import open_checkpoint

    named = raw.get("base_model_name_or_path")
    candidates = [named] if isinstance(named, str) and named else []
    if record and record.get("command") == "extract":
        candidates.append(record.get("base_model"))
    folder = next((c for c in candidates if isinstance(c, str) and os.path.isdir(c)), None)
    if folder is None:
        return "shapes not compared with the base (no local base model folder)", []
    try:
        base = open_checkpoint(folder)
    except ModelError as exc:
        return f"shapes not compared with the base ({folder}: {exc.what})", []
    numbers["base"] = base.folder
    try:
        found = [f for name, module in adapter.modules.items() for f in _module_shapes(adapter, base, name, module)]
        for target, key in adapter.replacements.items():
            theirs = base.tensors.get(target)
            mine = adapter.info(key).shape
            embedding = target in INPUT_EMBEDDINGS or target == OUTPUT_EMBEDDING   # the vocabulary may grow
            if theirs is None or (tuple(theirs.shape) != tuple(mine) and not embedding):
                have = "no such tensor" if theirs is None else f"shape {list(theirs.shape)}"
                found.append(Finding(f"shape {list(mine)}, the base {base.folder} has {have}", tensor=key, file=WEIGHTS))
    finally:
        base.close()
    return f"shapes agree with the base {base.folder}" if not found else "", found


def _module_shapes(adapter, base, name: str, module) -> list[Finding]:
    weight = base.tensors.get(f"{name}.weight")
    if weight is None:
        return [Finding(f"the base {base.folder} has no '{name}.weight' for this module", tensor=module.down,
                        file=WEIGHTS)]
    shape = tuple(weight.shape)
    down, up = adapter.info(module.down).shape, adapter.info(module.up).shape
    # linear/conv: A (r, in, ...), B (out, r, ...); an embedding (V, d): A (r, V), B (d, r)
    want_in, want_out = (shape[0], shape[1]) if module.is_embedding else (shape[1], shape[0])
    if len(shape) < 2 or down[1] != want_in or up[0] != want_out:
        return [Finding(f"A {list(down)} and B {list(up)} do not fit the base weight {list(shape)}",
                        tensor=module.down, file=WEIGHTS)]
    return []
