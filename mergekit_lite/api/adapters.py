"""``merge_adapters``: several LoRA adapters of one base combined into one PEFT adapter folder.

The arithmetic is peft's ``LoraModel.add_weighted_adapter`` (lora/combine.py), the checks its own plus the
ones peft skips (lora/combination.py). Everything is checked from headers and configs before a byte is
written; then each module's factors are read, combined and streamed into ``adapter_model.safetensors``
(header planned up front), and the folder (``adapter_config.json``, ``README.md``, ``merge_run.json``)
appears only when complete, with the output rules of every merge (OUT.partial, the lock, never replacing
what this tool did not write: output/place.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from ..errors import ModelError, UsageError
from ..lora.combination import CombinationPlan, check_combination, plan_combination
from ..lora.combine import Combination

if TYPE_CHECKING:
    from ..validation.report import ValidationReport

PathLike = Union[str, os.PathLike]
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterMergeResult:
    out: Optional[str]
    combination_type: str
    rank: int
    modules: int
    seconds: float
    bytes: int = 0
    dry_run: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # when out is None
    config: dict = field(default_factory=dict, repr=False)
    validation: Optional["ValidationReport"] = None   # None when not validated (validate=False, dry run, no out)

    @property
    def path(self) -> Optional[str]:
        return self.out

    def __str__(self) -> str:
        verb = "Would write" if self.dry_run else "Wrote"
        return (f"{verb} a rank-{self.rank} adapter ({self.combination_type}, {self.modules} modules) to "
                f"{self.out} in {self.seconds:.1f}s")


def merge_adapters(adapters: Sequence[PathLike], out: Optional[PathLike] = None, *,
                   combination_type: str = "svd", weights: Optional[Sequence[float]] = None,
                   density: Optional[float] = None, svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                   svd_full_matrices: bool = True, svd_driver: Optional[str] = None,
                   majority_sign_method: str = "total", seed: int = 0, check_base: bool = True,
                   overwrite: bool = False, dry_run: bool = False, allow_pickle: bool = False,
                   spec_text: Optional[str] = None, validate: bool = True, device: str = "auto",
                   strict: bool = True) -> AdapterMergeResult:
    """Combine PEFT LoRA ``adapters`` (local folders or Hub ids ``org/name[@revision]``) as peft's
    ``add_weighted_adapter(adapters, weights, name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
    svd_driver, density, majority_sign_method)`` does, and write the new adapter to ``out``.

    Without ``out``: return the new adapter's tensors and config in the result. ``seed`` keys the DARE masks
    (one random stream per module, see docs/adapters.md). ``spec_text``: the spec this combination came from
    (``output: adapter``), kept as ``mergekit_config.yml``. ``validate`` (the default): the written adapter is
    checked (structure, finite, a sample of modules combined again; ``result.validation``) on ``device``, and
    a failed validation raises ValidationFailed as run_merge does (``strict=False``: warns and returns)."""
    started = time.perf_counter()
    adapters = [os.fspath(a) for a in adapters]
    if not adapters:
        raise UsageError("no adapters to combine", where="ADAPTERS", hint="give two or more PEFT adapter folders")
    combo = Combination(combination_type, tuple(float(w) for w in (weights or [1.0] * len(adapters))), density,
                        svd_rank, svd_clamp, svd_full_matrices, svd_driver, majority_sign_method)
    check_combination(combo, len(adapters))
    if out is not None:
        from ..output.place import check_path

        check_path(os.fspath(out))
    with ExitStack() as opened:
        refs, hub = _resolve(adapters)   # every reference checked before the first download, as in merge run
        loaded = [opened.enter_context(_closing(_open(path, ref, allow_pickle, hub)))
                  for path, ref in zip(adapters, refs)]
        plan = plan_combination(loaded, combo, check_base)
        size = sum(4 * math.prod(shape) for _, shape in plan.tensors)
        result = AdapterMergeResult(None if out is None else os.fspath(out), plan.combination_type, plan.new_rank,
                                    len(plan.modules), 0.0, size, dry_run)
        if out is None:
            result.tensors = dict(_combined(plan, loaded, seed))
            result.config = plan.config
        elif not dry_run:
            _write(plan, loaded, os.fspath(out), seed, overwrite, spec_text, check_base, allow_pickle)
        else:
            _check_place(plan, loaded, os.fspath(out), seed, overwrite)
    result.seconds = time.perf_counter() - started
    if validate and out is not None and not dry_run:
        from .adapter_checks import validated

        return validated(result, device, strict, "merge_adapters")
    return result


def _resolve(adapters: list[str]) -> tuple[list, dict]:
    """Each adapter's reference, every local folder checked and every Hub one resolved (adapter files only)
    before anything is downloaded: the code `merge run` and `merge extract` use (plan/inputs.py, hub/pull.py)."""
    from ..plan.inputs import local_folder
    from ..spec.references import parse_reference

    refs = []
    for path in adapters:
        ref = parse_reference(path, "ADAPTERS")
        if ref.adapters:
            raise UsageError(f"'{path}' is a base+adapter reference", where="ADAPTERS",
                             hint="give the adapter folders themselves")
        local_folder(ref.model, "ADAPTERS", "adapter folder")
        refs.append(ref.model)
    remote = [(ref, "ADAPTERS", "adapter") for ref in refs if local_folder(ref, "ADAPTERS") is None]
    if not remote:
        return refs, {}
    from ..hub.pull import resolve_all

    return refs, resolve_all(remote)


def _open(path: str, ref, allow_pickle: bool, hub: dict):
    from ..hub.pull import ADAPTER_PATTERNS
    from ..lora.adapter import open_adapter
    from ..plan.inputs import fetch

    folder = fetch(ref, "ADAPTERS", hub, ADAPTER_PATTERNS)
    if not os.path.lexists(os.path.join(folder, CONFIG_NAME)) and os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelError("this is a full model (it has config.json and no adapter_config.json), not a LoRA adapter",
                         file=path, hint="give PEFT adapter folders; to make an adapter from a fine-tuned model, use "
                                         "`merge extract`; to merge full models, `merge run`")
    return open_adapter(folder, path, allow_pickle)


class _closing:
    def __init__(self, adapter):
        self.adapter = adapter

    def __enter__(self):
        return self.adapter

    def __exit__(self, *exc) -> None:
        self.adapter.close()


def _combined(plan: CombinationPlan, adapters: list, seed: int):
    """(key, tensor) of the new adapter, module by module: only one module's factors in memory at a time."""
    from ..lora.combination import combine_planned

    for module in plan.modules:
        down, up = combine_planned(plan, adapters, module, seed)
        yield module.down[0], down
        yield module.up[0], up


def _fingerprint(plan: CombinationPlan, adapters: list, seed: int) -> str:
    record = {"adapters": [a.folder for a in adapters], "combination": asdict(plan.combo), "seed": seed}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _check_place(plan: CombinationPlan, adapters: list, out: str, seed: int, overwrite: bool):
    from ..output.place import check_place

    return check_place(out, [a.folder for a in adapters], None, _fingerprint(plan, adapters, seed),
                       overwrite=overwrite, resume=False)


def _write(plan: CombinationPlan, adapters: list, out: str, seed: int, overwrite: bool,
           spec_text: Optional[str], check_base: bool, allow_pickle: bool) -> None:
    from ..output.adapter_record import write_adapter_record
    from ..output.folder import OutputLock, write_new
    from ..output.place import commit_partial, start_partial
    from ..output.run_settings import settings_for, write_run_settings
    from ..output.writer import ShardWriter
    from ..plan.shards import Entry

    _check_place(plan, adapters, out, seed, overwrite)
    with OutputLock(out):
        place = _check_place(plan, adapters, out, seed, overwrite)   # again, under the lock
        partial = start_partial(place, None, resume=False)
        entries = [Entry(key, torch.float32, shape) for key, shape in plan.tensors]
        writer = ShardWriter(os.path.join(partial, WEIGHTS_NAME), entries, {"format": "pt"})
        try:
            for key, tensor in _combined(plan, adapters, seed):
                writer.write(key, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        config = json.dumps(plan.config, indent=2, sort_keys=True) + "\n"
        write_new(os.path.join(partial, CONFIG_NAME), config.encode())
        write_new(os.path.join(partial, "README.md"), _card(plan, adapters, out, seed).encode())
        if spec_text:
            write_new(os.path.join(partial, "mergekit_config.yml"), spec_text.encode())
        write_run_settings(partial, settings_for(None, torch.float32, seed, torch.device("cpu")))
        write_adapter_record(partial, {"command": "adapters", "adapters": [a.folder for a in adapters],
                                       "labels": [a.label for a in adapters], "combination": asdict(plan.combo),
                                       "seed": seed, "check_base": check_base, "allow_pickle": allow_pickle})
        commit_partial(place)


def _card(plan: CombinationPlan, adapters: list, out: str, seed: int) -> str:
    from ..output.adapter_card import adapter_card_text

    combo = plan.combo
    parameters = {"density": combo.density, "svd_rank": combo.svd_rank if plan.combination_type.endswith("svd")
                  else None, "svd_clamp": combo.svd_clamp,
                  "majority_sign_method": combo.majority_sign_method if "ties" in plan.combination_type else None}
    return adapter_card_text(os.path.basename(os.path.abspath(out)), plan.config.get("base_model_name_or_path"),
                             [(a.label, w) for a, w in zip(adapters, combo.weights)], plan.combination_type,
                             plan.new_rank, parameters, seed)
