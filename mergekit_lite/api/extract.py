"""``extract_lora``: a PEFT LoRA adapter approximating a fine-tune's change from its base (what
mergekit-extract-lora does), streamed one module at a time.

Order: open both models (headers), decide every tensor's fate (extract_plan.py), check the output's place,
then under the output's lock, in ``OUT.partial``: for each module read FT and BASE, take the truncated SVD of
the float32 change on the compute device (lora/extract.py), append the factors to the adapter file; then
adapter_config.json, the card and our run record, and one rename into place. Memory holds one module's
change and its factors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import UsageError
from .extract_plan import ExtractionPlan, Selection, adapter_config, plan_extraction

PathLike = Union[str, os.PathLike]
CONFIG_FILE = "adapter_config.json"


@dataclass
class ExtractResult:
    out: str
    ranks: dict[str, int]                  # module -> rank written (modules of rank 0 are left out)
    modules_to_save: list[str]
    skipped: list[str]
    notes: list[str]
    seconds: float = 0.0
    methods: dict[str, int] = field(default_factory=dict)   # "exact"/"randomized" -> modules
    dry_run: bool = False
    summary: str = ""

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def __str__(self) -> str:
        saved = f", {len(self.modules_to_save)} module name(s) saved whole" if self.modules_to_save else ""
        return (f"Extracted a rank-{self.rank} LoRA adapter ({len(self.ranks)} modules{saved}) to {self.out} "
                f"in {self.seconds:.1f} s")


def extract_lora(model: PathLike, base_model: PathLike, out: PathLike, *, max_rank: int = 128,
                 sv_epsilon: float = 0.0, distribute_scale: bool = True, embed_lora: bool = False,
                 save_modules: Sequence[str] = (), include_regexes: Sequence[str] = (),
                 exclude_regexes: Sequence[str] = (), skip_undecomposable: bool = False, svd: str = "auto",
                 out_dtype: Optional[str] = None, device: str = "auto", overwrite: bool = False,
                 dry_run: bool = False) -> ExtractResult:
    """Extract ``model - base_model`` (local folders) as a PEFT LoRA adapter folder ``out``.

    Options are mergekit-extract-lora's: ``max_rank`` caps every module's rank; ``sv_epsilon`` > 0 keeps
    only singular values above it (absolute); ``distribute_scale`` splits sqrt(S) over both factors;
    ``embed_lora`` makes the input embeddings LoRA (else they are saved whole); ``save_modules`` are kept
    whole; ``include_regexes``/``exclude_regexes`` select modules (re.search on module names);
    ``skip_undecomposable`` leaves out norms and other tensors LoRA cannot hold instead of saving them whole.
    Ours: ``svd`` (auto, exact, randomized), ``out_dtype`` (default: FT's dtype), ``device``, ``overwrite``
    (replaces only an earlier output of ours), ``dry_run`` (check everything, write nothing).
    """
    from ..dtypes import parse_dtype
    from ..engine.devices import resolve_device
    from ..lora.extract import check_settings
    from ..output.place import check_place
    from ..sources.opener import open_checkpoint

    problem = check_settings(max_rank, float(sv_epsilon), svd)
    if problem:
        flag, _, what = problem.partition(": ")
        raise UsageError(what, where=flag, hint="see merge extract --help")
    compute = resolve_device(device)
    try:
        cast = parse_dtype(out_dtype) if out_dtype else None
    except ValueError as exc:
        raise UsageError(str(exc), where="--out-dtype", hint="float32 keeps the factors exact; the default is "
                                                            "the model's dtype") from None
    out = os.fspath(out)
    selection = Selection(embed_lora, tuple(save_modules), tuple(include_regexes), tuple(exclude_regexes),
                          skip_undecomposable)
    with ExitStack() as opened:
        ft = open_checkpoint(os.fspath(model))
        opened.callback(ft.close)
        base = open_checkpoint(os.fspath(base_model))
        opened.callback(base.close)
        if os.path.realpath(ft.folder) == os.path.realpath(base.folder):
            raise UsageError("--model and --base-model are the same folder, so there is no change to extract",
                             where="--base-model", hint="give the base model the fine-tune was trained from")
        plan = plan_extraction(ft, base, selection)
        settings = dict(max_rank=max_rank, sv_epsilon=float(sv_epsilon), distribute_scale=distribute_scale, svd=svd)
        run_id = _fingerprint(ft.folder, base.folder, selection, settings, out_dtype)
        place = check_place(out, [ft.folder, base.folder], None, run_id, overwrite=overwrite, resume=False)
        result = ExtractResult(out, {}, plan.modules_to_save, plan.skipped, plan.notes, dry_run=dry_run)
        if dry_run:
            result.summary = describe(plan, max_rank, out)
            return result
        started = time.perf_counter()
        _run(place, ft, base, plan, settings, cast, compute, result, os.fspath(base_model), overwrite)
        result.seconds = time.perf_counter() - started
        return result


def _run(place, ft, base, plan: ExtractionPlan, settings: dict, cast, compute: torch.device,
         result: ExtractResult, base_label: str, overwrite: bool) -> None:
    """Write the adapter into OUT.partial under the output's lock, then move it into place."""
    from ..output.folder import OutputLock
    from ..output.place import check_place, commit_partial, start_partial
    from ..output.run_settings import settings_for, write_run_settings

    with OutputLock(place.out):
        place = check_place(place.out, [ft.folder, base.folder], None, place.merge, overwrite=overwrite, resume=False)
        partial = start_partial(place, None, False)
        try:
            _write_tensors(os.path.join(partial, "adapter_model.safetensors"), ft, base, plan, settings, cast,
                           compute, result)
            if not result.ranks:
                raise UsageError("the fine-tuned model does not differ from the base in any module selected "
                                 "(every change has rank 0)", where="--model",
                                 hint="check that --model and --base-model are the right folders, or lower "
                                      "--sv-epsilon")
            config = adapter_config(base_label, ft.config, plan, result.ranks)
            _write_json(os.path.join(partial, CONFIG_FILE), config)
            _write_text(os.path.join(partial, "README.md"), card(ft.label, base_label, config, settings))
            write_run_settings(partial, settings_for(None, cast, 0, compute))
        except BaseException:
            _remove_partial(partial)
            raise
        commit_partial(place)


def _write_tensors(path: str, ft, base, plan: ExtractionPlan, settings: dict, cast, compute: torch.device,
                   result: ExtractResult) -> None:
    """Each job in FT's order: its LoRA factors (one module's change in memory at a time) or its whole tensor."""
    from ..lora.extract import decompose, seed_of
    from ..output.adapter_file import AdapterFile

    writer = AdapterFile(path, _largest_entries(plan, settings["max_rank"], cast))
    try:
        for job in plan.jobs:
            key = f"base_model.model.{job.name}"
            if job.kind == "save":
                tensor = ft.read(job.name)
                writer.write(key, tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor)
                continue
            delta = ft.read(job.name).to(compute, torch.float32) - base.read(job.name).to(compute, torch.float32)
            if job.kind == "embedding":
                delta = delta.T   # (d, V): A (r, V), B (d, r), as PEFT's lora_embedding_A/B
            factors = decompose(delta, settings["max_rank"], sv_epsilon=settings["sv_epsilon"],
                                distribute_scale=settings["distribute_scale"], svd=settings["svd"],
                                seed=seed_of(job.name))
            del delta
            result.methods[factors.method] = result.methods.get(factors.method, 0) + 1
            if factors.rank == 0:   # no change above the threshold: nothing to add to this module
                result.skipped.append(job.name)
                continue
            dtype = cast or job.dtype
            names = ("lora_embedding_A", "lora_embedding_B") if job.kind == "embedding" else \
                ("lora_A.weight", "lora_B.weight")
            writer.write(f"base_model.model.{job.module}.{names[0]}", factors.down.to(dtype))
            writer.write(f"base_model.model.{job.module}.{names[1]}", factors.up.to(dtype))
            result.ranks[job.module] = factors.rank
        writer.close()
    except BaseException:
        writer.abandon()
        raise


def _largest_entries(plan: ExtractionPlan, max_rank: int, cast) -> list:
    """Every tensor the adapter can hold, at its largest (each rank at its cap): sizes the header's room."""
    entries = []
    for job in plan.jobs:
        dtype = cast or job.dtype
        if job.kind == "save":
            entries.append((f"base_model.model.{job.name}", dtype, job.shape))
            continue
        rows, cols = job.shape if job.kind == "lora" else job.shape[::-1]
        rank = min(max_rank, rows, cols)
        a, b = ("lora_embedding_A", "lora_embedding_B") if job.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        entries += [(f"base_model.model.{job.module}.{a}", dtype, (rank, cols)),
                    (f"base_model.model.{job.module}.{b}", dtype, (rows, rank))]
    return entries


def describe(plan: ExtractionPlan, max_rank: int, out: str) -> str:
    """The dry run's summary."""
    lora = [j for j in plan.jobs if j.kind != "save"]
    saved = [j for j in plan.jobs if j.kind == "save"]
    lines = [f"Would extract {len(lora)} module(s) as LoRA (rank <= {max_rank}) into {out}"]
    if saved:
        lines.append(f"  saved whole (modules_to_save: {', '.join(plan.modules_to_save)}): {len(saved)} tensor(s)")
    if plan.skipped:
        lines.append(f"  left out: {len(plan.skipped)} tensor(s)")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def card(model_label: str, base_label: str, config: dict, settings: dict) -> str:
    """README.md of the adapter: PEFT front matter (Hub ids only), what it was extracted from, and how."""
    import yaml

    from ..spec.references import REPO_ID

    meta: dict = {"library_name": "peft", "tags": ["lora", "mergekit-lite", "extracted-lora"]}
    if REPO_ID.match(base_label) and not os.path.exists(base_label):
        meta["base_model"] = base_label
    ranks = f"rank {config['r']}" + (" (other ranks per module in rank_pattern)" if config["rank_pattern"] else "")
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# LoRA adapter extracted with mergekit_lite\n\n"
            f"The difference between {_code(model_label)} and its base {_code(base_label)}, as a PEFT LoRA "
            f"adapter: the truncated SVD of each module's change, {ranks}, scaling 1.\n\n"
            f"Settings: max_rank {settings['max_rank']}, sv_epsilon {settings['sv_epsilon']}, distribute_scale "
            f"{settings['distribute_scale']}, svd {settings['svd']}.\n\n"
            f"Fold it back: `merge fold BASE THIS_FOLDER -o OUT`, or load it with "
            f"`PeftModel.from_pretrained(base_model, THIS_FOLDER)`.\n")


def _code(text: str) -> str:
    """A one-line code span whose fence no run of backticks in ``text`` can close (CommonMark)."""
    import re

    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _fingerprint(ft: str, base: str, selection: Selection, settings: dict, out_dtype: Optional[str]) -> str:
    from .. import __version__

    text = json.dumps([ft, base, repr(selection), settings, out_dtype, __version__], sort_keys=True)
    return "extract-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: str, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")   # sort_keys: as PEFT saves it


def _write_text(path: str, text: str) -> None:
    from ..output.folder import write_new

    write_new(path, text.encode())


def _remove_partial(partial: str) -> None:
    """An unfinished extraction's partial folder holds only what it wrote: remove it (never anything else)."""
    from ..output.ownership import partial_names, remove_ours

    ours = {"adapter_model.safetensors", CONFIG_FILE, "README.md"}
    try:
        remove_ours(partial, lambda name: name in ours or partial_names(name))
    except OSError:
        pass

