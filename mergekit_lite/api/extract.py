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
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from ..errors import UsageError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelPath
from .adapter_checks import validated
from .extract_plan import ExtractionPlan, Selection, adapter_config, plan_extraction

if TYPE_CHECKING:
    from ..validation.report import ValidationReport

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
    methods: dict[str, int] = field(default_factory=dict)   # "exact"/"gram"/"randomized" -> modules
    dry_run: bool = False
    summary: str = ""
    validation: Optional["ValidationReport"] = None   # None when not validated (validate=False, dry run)

    @property
    def path(self) -> str:
        return self.out

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
                 dry_run: bool = False, validate: bool = True, strict: bool = True,
                 progress: bool = True) -> ExtractResult:
    """Extract ``model - base_model`` as a PEFT LoRA adapter folder ``out``. Each is a local folder or a Hub id
    ``org/name[@revision]``, resolved and downloaded as `merge run` does (a dry run downloads too: the plan
    reads the safetensors headers); ``progress=False``: no huggingface_hub download bar.

    Options are mergekit-extract-lora's: ``max_rank`` caps every module's rank; ``sv_epsilon`` > 0 keeps
    only singular values above it (absolute); ``distribute_scale`` splits sqrt(S) over both factors;
    ``embed_lora`` makes the input embeddings LoRA (else they are saved whole); ``save_modules`` are kept
    whole; ``include_regexes``/``exclude_regexes`` select modules (re.search on module names);
    ``skip_undecomposable`` leaves out norms and other tensors LoRA cannot hold instead of saving them whole.
    Ours: ``svd``: ``auto`` (default) is ``gram`` when both sides of a module are >= 512, else ``exact``
    (torch.linalg.svd, as mergekit); ``gram`` takes the top singular vectors from the float64 eigendecomposition
    of the smaller Gram matrix (as close as the exact SVD, 2-5x faster on large modules) and runs the exact SVD
    when less than 1% of the change would be left over; ``randomized`` (torch.svd_lowrank, seeded) is faster
    still but up to 0.3% further from the fine-tune on noise-like changes. ``out_dtype`` (default: FT's dtype),
    ``device``, ``overwrite`` (replaces only an earlier output of ours), ``dry_run`` (check everything, write
    nothing), ``validate`` (default: check the written adapter, ``result.validation``; a failure raises
    ValidationFailed as run_merge does, ``strict=False`` warns instead).
    """
    from ..engine.devices import resolve_device
    from ..hub.client import quiet_hub
    from ..output.place import check_place

    cast = _checked_options(max_rank, sv_epsilon, svd, out_dtype)
    compute = resolve_device(device)
    out = os.fspath(out)
    selection = Selection(embed_lora, tuple(save_modules), tuple(include_regexes), tuple(exclude_regexes),
                          skip_undecomposable)
    with ExitStack() as opened:
        if not progress:   # as run_merge(progress=False): no huggingface_hub download bar either
            opened.enter_context(quiet_hub(True))
        (ft, _), (base, base_path) = open_models([(model, "--model"), (base_model, "--base-model")], opened)
        if os.path.realpath(ft.folder) == os.path.realpath(base.folder):
            same = "folder" if ft.commit is None else "model (one Hub snapshot)"
            raise UsageError(f"--model and --base-model are the same {same}, so there is no change to extract",
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
        _run(place, ft, base, plan, settings, cast, compute, result, base_path, overwrite)
        result.seconds = time.perf_counter() - started
    return validated(result, device, strict, "extract_lora") if validate else result


def _checked_options(max_rank: int, sv_epsilon: float, svd: str, out_dtype: Optional[str]):
    """The settings checked (a UsageError naming the option), and the dtype to cast the adapter to (or None)."""
    from ..dtypes import parse_dtype
    from ..lora.extract import check_settings

    problem = check_settings(max_rank, float(sv_epsilon), svd)
    if problem:
        flag, _, what = problem.partition(": ")
        raise UsageError(what, where=flag, hint="see merge extract --help")
    try:
        return parse_dtype(out_dtype) if out_dtype else None
    except ValueError as exc:
        raise UsageError(str(exc), where="--out-dtype", hint="float32 keeps the factors exact; the default is "
                                                            "the model's dtype") from None


def open_models(references: list[tuple[PathLike, str]], opened: ExitStack) -> list[tuple[Checkpoint, ModelPath]]:
    """Open each ``(reference, option)``: a local folder, or a Hub id ``org/name[@revision]``, as `merge run`
    opens a spec's models (plan/inputs.py, hub/pull.py): every local folder checked and every Hub reference
    resolved before the first download; then downloaded (into the Hub cache, only what a merge reads) and
    opened from the headers. Errors name the option. Each checkpoint is closed by ``opened``."""
    from ..plan.inputs import local_folder, open_reference, resolve_hub_inputs
    from ..spec.references import parse_reference

    refs = []
    for value, where in references:
        ref = parse_reference(os.fspath(value), where)
        if ref.adapters:
            raise UsageError(f"'{value}' is a base+adapter reference; extraction takes two whole models",
                             where=where, hint=f"fold it first (`merge fold {ref.model} "
                                               f"{' '.join(str(a.path) for a in ref.adapters)} -o FOLDER`), then "
                                               "give FOLDER")
        local_folder(ref.model, where)   # a missing local folder fails before any Hub request
        refs.append((ref, where))
    hub = resolve_hub_inputs(refs)       # every Hub reference checked before the first download
    checkpoints = []
    for ref, where in refs:
        checkpoint = open_reference(ref, where, hub)
        opened.callback(checkpoint.close)
        checkpoints.append((checkpoint, ref.model))
    return checkpoints


def _run(place, ft, base, plan: ExtractionPlan, settings: dict, cast, compute: torch.device,
         result: ExtractResult, base_path: ModelPath, overwrite: bool) -> None:
    """Write the adapter into OUT.partial under the output's lock, then move it into place."""
    from ..dtypes import dtype_name
    from ..output.adapter_record import write_adapter_record
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
            config = adapter_config(base_path.path, ft.config, plan, result.ranks)
            if base_path.revision is not None:   # PEFT loads the base at this revision (mergekit leaves it out)
                config["revision"] = base_path.revision
            _write_json(os.path.join(partial, CONFIG_FILE), config)
            _write_text(os.path.join(partial, "README.md"),
                        card(_pinned(ft), base_path.path, config, settings, _pinned(base)))
            write_run_settings(partial, settings_for(None, cast, 0, compute))
            write_adapter_record(partial, {"command": "extract", "model": ft.folder, "base_model": base.folder,
                                           "settings": settings, "out_dtype": dtype_name(cast) if cast else None,
                                           "device": compute.type})
        except BaseException:
            _remove_partial(partial)
            raise
        commit_partial(place)


def _write_tensors(path: str, ft, base, plan: ExtractionPlan, settings: dict, cast, compute: torch.device,
                   result: ExtractResult) -> None:
    """Each job in FT's order: its LoRA factors (one module's change in memory at a time) or its whole tensor."""
    from ..lora.extract import extract_module
    from ..output.adapter_file import AdapterFile

    writer = AdapterFile(path, _largest_entries(plan, settings["max_rank"], cast))
    try:
        for job in plan.jobs:
            key = f"base_model.model.{job.name}"
            if job.kind == "save":
                tensor = ft.read(job.name)
                writer.write(key, tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor)
                continue
            # an embedding's change is decomposed as (d, V): A (r, V), B (d, r), as PEFT's lora_embedding_A/B
            factors = extract_module(ft, base, job.name, job.kind == "embedding", settings, compute)
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


def _pinned(checkpoint: Checkpoint) -> str:
    """The reference as given, with the Hub commit its files came from."""
    return checkpoint.label if checkpoint.commit is None else f"{checkpoint.label} (commit {checkpoint.commit})"


def card(model_label: str, base_label: str, config: dict, settings: dict, base_text: Optional[str] = None) -> str:
    """README.md of the adapter: PEFT front matter (Hub ids only), what it was extracted from, and how.
    ``base_text``: how the prose names the base (default ``base_label``)."""
    import yaml

    from ..spec.references import REPO_ID

    meta: dict = {"library_name": "peft", "tags": ["lora", "mergekit-lite", "extracted-lora"]}
    if REPO_ID.match(base_label) and not os.path.exists(base_label):
        meta["base_model"] = base_label
    ranks = f"rank {config['r']}" + (" (other ranks per module in rank_pattern)" if config["rank_pattern"] else "")
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# LoRA adapter extracted with mergekit_lite\n\n"
            f"The difference between {_code(model_label)} and its base {_code(base_text or base_label)}, as a PEFT "
            f"LoRA adapter: the truncated SVD of each module's change, {ranks}, scaling 1.\n\n"
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

    ours = {"adapter_model.safetensors", CONFIG_FILE, "README.md", "adapter_record.json"}
    try:
        remove_ours(partial, lambda name: name in ours or partial_names(name))
    except OSError:
        pass

