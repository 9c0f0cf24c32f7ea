"""What a LoRA extraction will do, decided from the two models' headers before any tensor is computed.

Every tensor of the fine-tuned model (FT) gets one fate, as mergekit-extract-lora 0.1.5 decides it:

- ``lora``: a 2-D ``M.weight`` of a linear module: its change FT - BASE becomes ``M.lora_A/B.weight``;
- ``embedding``: the input embeddings with ``--embed-lora``: ``M.lora_embedding_A/B``;
- ``save``: kept whole from FT in ``modules_to_save`` (its module's last name is listed): embeddings without
  ``--embed-lora`` (and both embeddings when the vocabularies differ), ``--save-module`` modules, and the
  modules LoRA cannot hold (norms, other 1-D or >2-D tensors) unless ``--skip-undecomposable``;
- skipped: modules the include/exclude regexes leave out, and undecomposable ones with ``--skip-undecomposable``.

A bias of a LoRA module must be unchanged (PEFT's plain LoRA cannot carry a bias change): that is checked by
reading the bias (small) here, so a refusal comes before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..architecture import INPUT_EMBEDDINGS, OUTPUT_EMBEDDING
from ..errors import ModelError, UsageError
from ..sources.checkpoint import Checkpoint

SAME_BASE = "give the base model this fine-tune was trained from (same architecture and tensor names)"


@dataclass(frozen=True)
class Job:
    name: str                 # FT tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    module: str               # model.layers.0.self_attn.q_proj
    kind: str                 # "lora", "embedding" or "save"
    shape: tuple[int, ...]
    dtype: torch.dtype        # FT's stored dtype


@dataclass
class ExtractionPlan:
    jobs: list[Job]
    modules_to_save: list[str]                          # module keys as PEFT matches them (last name part)
    modules: set[str] = field(default_factory=set)      # every module of FT (that has tensors)
    skipped: list[str] = field(default_factory=list)    # FT tensors left out of the adapter
    notes: list[str] = field(default_factory=list)      # what the run should tell the user

    def lora_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.kind != "save"]


@dataclass(frozen=True)
class Selection:
    """The options that decide each module's fate (mergekit-extract-lora's names)."""

    embed_lora: bool = False
    save_modules: Sequence[str] = ()
    include_regexes: Sequence[str] = ()
    exclude_regexes: Sequence[str] = ()
    skip_undecomposable: bool = False

    def compiled(self) -> tuple[list[re.Pattern], list[re.Pattern]]:
        return _compile(self.include_regexes, "--include-regex"), _compile(self.exclude_regexes, "--exclude-regex")


def _compile(patterns: Iterable[str], flag: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"{pattern!r} is not a regular expression: {exc}", where=flag,
                             hint="it is matched (re.search) against module names like model.layers.0.mlp.up_proj")
    return compiled


def check_pair(model: Checkpoint, base: Checkpoint) -> bool:
    """Same architecture and tensor names; shapes equal except the vocabulary rows of the embeddings. Returns
    whether the vocabularies differ."""
    archs = model.config.get("architectures"), base.config.get("architectures")
    if archs[0] != archs[1]:
        raise ModelError(f"the fine-tuned model is {_arch(archs[0])} but the base is {_arch(archs[1])}",
                         file=model.label, hint=SAME_BASE)
    for name in model.tensors:
        if name not in base.tensors:
            raise ModelError(f"tensor '{name}' is in the fine-tuned model but not in the base", file=base.label,
                             hint=SAME_BASE)
    for name in base.tensors:
        if name not in model.tensors:
            raise ModelError(f"tensor '{name}' is in the base but not in the fine-tuned model", file=model.label,
                             hint=SAME_BASE)
    vocab_differs = False
    for name, info in model.tensors.items():
        theirs = base.tensors[name].shape
        if tuple(info.shape) == tuple(theirs):
            continue
        if _is_embedding(name) and len(theirs) == 2 and info.shape[1:] == theirs[1:]:
            vocab_differs = True
            continue
        raise ModelError(f"shape {list(info.shape)} != base {list(theirs)}", where=f"tensor '{name}'",
                         file=model.label, hint=SAME_BASE)
    return vocab_differs


def plan_extraction(model: Checkpoint, base: Checkpoint, selection: Selection) -> ExtractionPlan:
    vocab_differs = check_pair(model, base)
    include, exclude = selection.compiled()
    embed_lora = selection.embed_lora
    plan = ExtractionPlan([], [], modules={name.rpartition(".")[0] for name in model.tensors})
    if vocab_differs and embed_lora:
        plan.notes.append("the vocabularies differ, so the embeddings are saved whole (modules_to_save), "
                          "not as LoRA")
        embed_lora = False
    save = set(selection.save_modules)
    for name, info in model.tensors.items():
        module, _, leaf = name.rpartition(".")
        key = module.rpartition(".")[2]
        job = Job(name, module, "save", tuple(info.shape), info.dtype)
        excluded = any(p.search(module) for p in exclude)
        if _is_embedding(name) and not embed_lora and not excluded:
            save.add(key)   # mergekit: embeddings are kept whole unless --embed-lora
        if module in save or key in save:
            _save(plan, job, key)
        elif excluded or (include and not any(p.search(module) for p in include)):
            plan.skipped.append(name)
        elif leaf == "weight" and len(info.shape) == 2:   # lm_head is a linear module (as in mergekit)
            kind = "embedding" if name in INPUT_EMBEDDINGS else "lora"
            plan.jobs.append(Job(name, module, kind, job.shape, job.dtype))
        elif leaf == "bias" and f"{module}.weight" in model.tensors and len(model.tensors[f"{module}.weight"].shape) == 2:
            _check_bias_unchanged(model, base, name, selection.skip_undecomposable, plan)
        elif selection.skip_undecomposable:
            plan.skipped.append(name)
        else:
            _save(plan, job, key)
    if not plan.jobs:
        raise UsageError("no module is left to extract as LoRA", where="--include-regex/--exclude-regex",
                         hint="check the regexes against the module names (e.g. model.layers.0.mlp.up_proj)")
    return plan


def _save(plan: ExtractionPlan, job: Job, key: str) -> None:
    plan.jobs.append(job)
    if key not in plan.modules_to_save:
        plan.modules_to_save.append(key)


def _check_bias_unchanged(model: Checkpoint, base: Checkpoint, name: str, skip: bool, plan: ExtractionPlan) -> None:
    """A LoRA module's bias: PEFT's plain LoRA adds no bias, so a changed one cannot be carried."""
    if torch.equal(model.read(name).float(), base.read(name).float()):
        return
    if skip:
        plan.skipped.append(name)
        plan.notes.append(f"the change of '{name}' is not in the adapter (--skip-undecomposable)")
        return
    module = name.rpartition(".")[0]
    raise ModelError("the bias changed, and a LoRA module's bias cannot be extracted", where=f"tensor '{name}'",
                     file=model.label, hint=f"pass --save-module {module} to keep that module whole, or "
                                            "--skip-undecomposable to leave the bias at the base's value")


def _is_embedding(name: str) -> bool:
    return name in INPUT_EMBEDDINGS or name == OUTPUT_EMBEDDING


def _arch(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else "of no named architecture" \
        if value is None else str(value)


def adapter_config(base_label: str, model_config: dict, plan: ExtractionPlan, ranks: dict[str, int]) -> dict:
    """adapter_config.json: r = the largest rank, lora_alpha = r (scaling 1), the other ranks as patterns.

    ``ranks``: module -> rank of every module written as LoRA (rank 0 modules are left out by the caller).
    """
    top = max(ranks.values())
    different = {module: rank for module, rank in ranks.items() if rank != top}
    archs = model_config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in archs)
    return {
        "base_model_name_or_path": base_label, "peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
        "r": top, "lora_alpha": top, "rank_pattern": different, "alpha_pattern": dict(different),
        "target_modules": target_modules(ranks, plan), "modules_to_save": plan.modules_to_save or None,
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
        "init_lora_weights": True, "inference_mode": True,
    }


def target_modules(ranks: dict[str, int], plan: ExtractionPlan) -> list[str]:
    """The modules' last names (as mergekit writes them) when every module of FT with that name has LoRA
    factors; else the full module names, so PEFT adds no empty LoRA layer to the others."""
    keys = {m.rpartition(".")[2] for m in ranks}
    if all(m in ranks for m in plan.modules if m.rpartition(".")[2] in keys) and not keys & set(plan.modules_to_save):
        return sorted(keys)
    return sorted(ranks)
