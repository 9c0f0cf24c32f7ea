"""``run_moe``: build a mixture of experts from dense models (mergekit-moe's YAML), for notebooks and `merge moe`."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Union

from ..errors import UsageError
from ..output.folder import OutputLock, check_free_space
from ..output.place import check_path
from ..spec.moe import MoESpec, is_moe, load_moe, parse_moe
from .merge import MergeResult, MergeSettings, _check_place, _check_settings, _execute


def load_moe_spec(spec: Union[str, os.PathLike, dict, MoESpec]) -> MoESpec:
    if isinstance(spec, MoESpec):
        return spec
    if isinstance(spec, dict):
        return parse_moe(spec)
    text_or_path = os.fspath(spec)
    if os.path.exists(text_or_path) or "\n" not in text_or_path:
        from ..spec.safe_yaml import load_yaml, read_spec_file

        data = load_yaml(read_spec_file(text_or_path), text_or_path)
        if not is_moe(data):
            raise UsageError("this is a merge spec, not a MoE file (no experts:)", where=text_or_path,
                             hint=f"run it with `merge run {text_or_path} OUT`")
        return load_moe(text_or_path)
    from ..spec.safe_yaml import load_yaml

    return parse_moe(load_yaml(text_or_path, None), text=text_or_path)


def run_moe(spec: Union[str, os.PathLike, dict, MoESpec], out: Union[str, os.PathLike],
            settings: Optional[MergeSettings] = None, *, allow_all_same: bool = False, **changes: Any) -> MergeResult:
    """Build the mixture of experts a mergekit-moe file describes into ``out`` (which appears only when
    complete). ``settings`` as for run_merge (max_shard_size, device, seed, overwrite, dry_run, validate, ...);
    ``allow_all_same``: build it even when every expert is the same model (mergekit-moe's
    --i-understand-this-is-not-useful-without-training)."""
    from ..engine.router import compute_routers
    from ..plan.moe_plan import plan_moe

    started = time.perf_counter()
    run = dataclasses.replace(settings or MergeSettings(), **changes)
    out = os.fspath(out)
    shard_bytes, device = _check_settings(run)
    moe = load_moe_spec(spec)
    plan = plan_moe(moe, seed=run.seed, allow_pickle=run.allow_pickle, allow_all_same=allow_all_same)
    try:
        check_path(out)
        check_free_space(out, plan.total_bytes)
        if run.dry_run:
            _check_place(plan, out, shard_bytes, device, run)
            return MergeResult(out, len(plan.jobs), plan.total_bytes, time.perf_counter() - started, dry_run=True,
                               summary=f"{plan.output} MoE of {len(moe.experts)} experts, {plan.layers} layers: "
                                       f"{len(plan.jobs)} tensors")
        with OutputLock(out):
            place = _check_place(plan, out, shard_bytes, device, run)
            compute_routers(plan, device, _streamed_base)
            result = _execute(plan, place, shard_bytes, device, started, run, [])
            if run.validate:
                result = dataclasses.replace(result, validation=_validate(out, device, run))
    finally:
        plan.close()
    return result


def _streamed_base(folder: str, device):
    """The base model for hidden-state routers in bfloat16 (as mergekit-moe), its weights read layer by layer as
    it runs, so memory holds one layer (validation/streamed.py); None when transformers converts its tensors
    beyond renaming them."""
    import torch

    from ..errors import ModelError
    from ..validation.inference import IncompleteModel, _quiet
    from ..validation.streamed import streamed_model

    try:
        with _quiet():
            return streamed_model(folder, device, dtype=torch.bfloat16)
    except IncompleteModel as exc:
        raise ModelError(f"the base model cannot run on the prompts: {exc}", file=folder,
                         hint="gate_mode hidden runs the base model; check its files, or use gate_mode: "
                              "cheap_embed") from None


def _validate(out: str, device, run: MergeSettings):
    """Structure, finite values and the forward pass; a MoE is not recomputed from a merge spec (validation/record.py
    says so). The base model runs only when the MoE must equal a dense model (validation/moe_forward.py): its loss
    as context is left to `merge validate`."""
    from ..validation import validate

    return validate(out, device=device, allow_pickle=run.allow_pickle, allow_nonfinite=run.allow_nonfinite,
                    progress=run.progress, context_inputs=False)
