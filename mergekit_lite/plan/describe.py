"""Human-readable descriptions: a planned merge (``--dry-run``) and the strategy table (``merge methods``)."""

from __future__ import annotations

from ..dtypes import dtype_name
from ..strategy import Strategy
from ..units import format_size
from .planner import MergePlan
from .shards import Entry, plan_shards


def describe_plan(plan: MergePlan, out: str, shard_bytes: int) -> str:
    shards = plan_shards([Entry(j.name, j.dtype, j.shape) for j in plan.jobs], shard_bytes)
    dtypes = sorted({dtype_name(j.dtype) for j in plan.jobs})
    lines = [f"method: {plan.strategy.name} ({plan.strategy.title})", "inputs:"]
    for checkpoint in plan.checkpoints.values():
        size = sum(t.nbytes for t in checkpoint.tensors.values())
        lines.append(f"  {checkpoint.label}: {len(checkpoint.tensors)} tensors, {format_size(size)}")
    lines.append(f"output: {out}: {len(plan.jobs)} tensors, {format_size(plan.total_bytes)} "
                 f"({', '.join(dtypes)}) in {len(shards)} shard(s) of at most {format_size(shard_bytes)}")
    vocab = plan.vocabulary
    if vocab is not None:   # a tokenizer merge (vocabulary.py)
        source = vocab.spec.source if isinstance(vocab.spec.source, str) else f"from {vocab.spec.source}"
        remapped = sorted({s.checkpoint.label for j in plan.jobs for s in j.sources if hasattr(s, "digest")})
        lines.append(f"tokenizer: {source}, {len(vocab.tokens)} tokens ({vocab.size} embedding rows); rows lined up "
                     f"by token text for: {', '.join(remapped) or 'none (every model already matches)'}")
    samples = _sample_jobs(plan)
    if samples and any(j.params for j in samples):
        lines.append("parameters (a sample of tensors):")
        for job in samples:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
            lines.append(f"  {job.name}: {shown}")
    lines.append("dry run: everything checked, nothing written")
    return "\n".join(lines)


def _sample_jobs(plan: MergePlan):
    layered = [j for j in plan.jobs if j.layer is not None]
    picks = [plan.jobs[0], *(layered[:1] + layered[-1:]), plan.jobs[-1]]
    seen, out = set(), []
    for job in picks:
        if job.name not in seen:
            seen.add(job.name)
            out.append(job)
    return out


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"   # as YAML writes it
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe_strategies(strategies: list[Strategy]) -> str:
    lines = []
    for s in sorted(strategies, key=lambda s: s.name):
        params = ", ".join(p.name + ("" if p.required else f"={_fmt(p.default)}") for p in s.params)
        lines.append(f"{s.name:18} {s.summary}")
        lines.append(f"{'':18} parameters: {params or '-'}")
    lines.append("\n`merge methods NAME` shows one method in detail.")
    return "\n".join(lines)


def describe_strategy(s: Strategy) -> str:
    base = {"required": "required", "optional": "optional",
            "input": "optional; when given it is merged as one more input"}[s.base]
    count = (f"exactly {s.min_inputs}" if s.min_inputs == s.max_inputs
             else f"{s.min_inputs} or more" if s.max_inputs is None else f"{s.min_inputs} to {s.max_inputs}")
    lines = [f"{s.name}: {s.title}", f"  {s.summary}"]
    if s.paper:
        lines.append(f"  paper: {s.paper}")
    lines += [f"  base_model: {base}", f"  models (besides a separate base): {count}",
              f"  random: {'yes (seeded by --seed and the tensor name)' if s.random else 'no'}",
              "  parameters:" if s.params else "  parameters: none"]
    for p in s.params:
        scope = "per model" if p.per_model else "per merge"
        if p.per_model and not p.for_base:
            scope += ", not for the base"
        default = "required" if p.required else f"default {_fmt(p.default)}"
        lines.append(f"    {p.name} ({p.type.__name__}, {scope}, {default}, range {p.range_text()}): {p.description}")
    if s.params:
        lines.append("  Every parameter accepts a value, a gradient list, or a list of {filter, value} entries.")
    if s.details:
        lines += [""] + ["  " + line for line in s.details.splitlines()]
    return "\n".join(lines)
