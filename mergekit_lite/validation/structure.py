"""Check 1, structure: the files are readable, the index matches the shards, the tensors match the plan
and config.json.

Three sources of truth are compared with what is on disk: the safetensors headers themselves (parsed
strictly), the plan made again from the spec (which tensors, which shapes, which dtypes, which config), and
config.json (a loader builds the model from it, so its dimensions must fit the tensors).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from ..architecture import get_config_value
from ..dtypes import dtype_name
from ..plan.planner import OUTPUT_EMBEDDING, MergePlan
from ..safetensors_format import same_bytes
from ..sources.checkpoint import INDEX_FILE
from .config_rules import INPUT_EMBEDDINGS, KEYS, check_config
from .folder import OutputFolder
from .report import CheckResult, Finding, not_checked, outcome
from .stream import TensorReader

# config.json keys the plan decides and a loader depends on. Other keys may legitimately differ (a tool that
# re-saves the config through transformers adds defaults and its version).
PLANNED_KEYS = ("architectures", "model_type", "tie_word_embeddings", "num_hidden_layers", "n_layer",
                "num_layers") + tuple(key for keys in KEYS.values() for key in keys)


def check_structure(folder: OutputFolder, plan: Optional[MergePlan], plan_problem: Optional[str],
                    extra_findings: list[Finding]) -> CheckResult:
    started = time.perf_counter()
    failures = list(folder.findings) + extra_findings
    if folder.pickle_only and plan is None and not failures:
        return not_checked("structure", f"the weights are pickle files ({', '.join(folder.pickles[:3])}): the "
                           "structure is read from safetensors files only", _numbers(folder, None, 0),
                           time.perf_counter() - started)
    if not folder.tensors and not failures:
        failures.append(Finding("the folder holds no tensors a loader would read",
                                file=INDEX_FILE if folder.indexed else None))
    shapes = {name: info.shape for name, info in folder.tensors.items()}
    dtypes = {name: info.dtype for name, info in folder.tensors.items()}
    planned = None
    if plan is not None:
        planned = len(plan.jobs)
        failures += _against_plan(folder, plan)
    rules, config_failures = check_config(folder.config, shapes, dtypes if plan is None else None)
    failures += [_in_file(folder, f) for f in config_failures] + _tied_head(folder)
    numbers = _numbers(folder, planned, rules)
    against = "the spec's plan and " if plan is not None else ""
    layout = "shards and index consistent" if folder.indexed else "header consistent"
    summary = (f"{len(folder.tensors)} tensors in {len(folder.shards)} file(s), {layout}, "
               f"matching {against}config.json ({rules} rule(s))")
    if plan is None and plan_problem:
        summary += f"; not compared with a plan: {plan_problem}"
    if not folder.config:
        summary += "; no config.json"
    return outcome("structure", failures, summary, numbers, time.perf_counter() - started)


def _numbers(folder: OutputFolder, planned: Optional[int], rules: int) -> dict[str, Any]:
    return {"files": len(folder.shards), "tensors": len(folder.tensors), "bytes": folder.total_bytes,
            "planned_tensors": planned, "config_rules": rules}


def _against_plan(folder: OutputFolder, plan: MergePlan) -> list[Finding]:
    """Exactly the planned tensors, with the planned shapes and dtypes, and the planned config."""
    findings = []
    jobs = {job.name: job for job in plan.jobs}
    for name, job in jobs.items():
        info = folder.tensors.get(name)
        if info is None:
            if not any(name in held for held in folder.shards.values()):   # else the index finding says it
                findings.append(Finding("is missing: the spec's merge produces it", tensor=name))
        elif info.shape != job.shape:
            findings.append(Finding(f"shape {list(info.shape)} != {list(job.shape)} planned from the spec",
                                    tensor=name, file=folder.file_of(info)))
        elif info.dtype != job.dtype:
            findings.append(Finding(f"dtype {dtype_name(info.dtype)} != {dtype_name(job.dtype)} planned from the spec",
                                    tensor=name, file=folder.file_of(info)))
    for name, info in folder.tensors.items():
        if name not in jobs:
            findings.append(Finding("is not produced by the spec's merge", tensor=name, file=folder.file_of(info)))
    if plan.config and not folder.config and not any(f.file == "config.json" for f in folder.findings):
        there = os.path.exists(os.path.join(folder.path, "config.json"))
        findings.append(Finding(f"is {'empty' if there else 'missing'}: the spec's merge writes the model's config",
                                file="config.json"))
    if folder.config and plan.config:
        want, got = _declared_dtype(plan.config), _declared_dtype(folder.config)
        if want is not None and got != want:
            findings.append(Finding(f"the dtype is {_json(got)}, the spec's merge gives {_json(want)}",
                                    file="config.json"))
        for key in PLANNED_KEYS:
            want, got = get_config_value(plan.config, key), get_config_value(folder.config, key)
            if want is not None and got != want:
                findings.append(Finding(f"{key} is {_json(got)}, the spec's merge gives {_json(want)}",
                                        file="config.json"))
    return findings


def _in_file(folder: OutputFolder, finding: Finding) -> Finding:
    """Name the shard that holds the tensor a finding is about."""
    info = folder.tensors.get(finding.tensor or "")
    return Finding(finding.message, finding.tensor, folder.file_of(info)) if info and not finding.file else finding


def _tied_head(folder: OutputFolder) -> list[Finding]:
    """A written lm_head in a model whose config ties it is replaced by the embeddings when loaded: harmless
    only if the two are the same bytes."""
    head = folder.tensors.get(OUTPUT_EMBEDDING)
    if folder.config.get("tie_word_embeddings") is not True or head is None:
        return []
    embedding = next((folder.tensors[n] for n in INPUT_EMBEDDINGS if n in folder.tensors), None)
    if embedding is not None and (embedding.shape, embedding.dtype) == (head.shape, head.dtype):
        with TensorReader() as reader:
            if same_bytes(reader.read(embedding), reader.read(head)):
                return []
    return [Finding("differs from the input embeddings, but config.json says tie_word_embeddings: true, so "
                    "transformers replaces it with them on load", tensor=OUTPUT_EMBEDDING, file="config.json")]


def _declared_dtype(config: dict[str, Any]) -> Any:
    """transformers 4 writes torch_dtype, 5 writes dtype: either says the same thing."""
    return config.get("dtype", config.get("torch_dtype"))


def _json(value: Any) -> str:
    return json.dumps(value)
