"""Check 4, forward pass: the merged model loads in transformers and runs; its loss sits beside its inputs'.

The merged model runs a fixed batch (the output's tokenizer on fixed prompts, else fixed token ids; a VLM runs as
image-text-to-text on that text alone, never fed its image tokens): its
logits must be finite, and every tensor must be filled from the files. Each input model runs the same
batch, so the report shows each input's loss beside the merged model's. When the output is supposed to
compute what one input computes, their logits are compared: a merge of identical inputs by a method that
is the identity on identical inputs, and a LoRA fold (one input ``base+adapter``), whose reference is the
base with the adapter applied at inference time by peft (``inference.apply_adapters``).

Tolerance rule for that comparison: max |logit difference| <= rtol * max(1, max |reference logit|), with
rtol = max(8 * eps(output dtype), 1e-4): both run in float32, so what differs is the rounding of each weight
to the output dtype (half an ulp each, accumulated over the layers).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import MergeError
from ..plan.inputs import fetch
from ..plan.planner import MergePlan
from ..spec.references import ModelPath, ModelRef
from ..spec.schema import Spec
from ..strategy import TensorContext
from ..units import format_size
from .folder import OutputFolder
from .report import CheckResult, Finding, not_checked, number, outcome

MEMORY_MARGIN = 1.25        # float32 weights plus activations, buffers and the allocator's slack
ADAPTER_PATTERNS = ("adapter_config.json", "*.safetensors")


@dataclass(frozen=True)
class InputModel:
    label: str                              # as the spec wrote it
    folder: Optional[str]                   # None when it cannot be found (then ``problem`` says why)
    adapters: tuple[tuple[str, float], ...] = ()
    problem: Optional[str] = None


def check_forward(folder: OutputFolder, spec: Optional[Spec], plan: Optional[MergePlan], device: torch.device, *,
                  allow_pickle: bool = False, plan_problem: Optional[str] = None) -> CheckResult:
    """Passed, failed, or not checked with the reason: transformers missing, no config.json, custom code, an
    architecture transformers does not know, pickle weights without ``allow_pickle``, not enough memory, or
    (with a spec) an input the merge should equal that could not be run."""
    started = time.perf_counter()
    reason = _cannot_run(folder, device, allow_pickle)
    if reason:
        return not_checked("forward", reason, empty_numbers(), time.perf_counter() - started)
    from .inference import IncompleteModel, batch_loss, load_model, logits_of, make_batch

    batch = make_batch(folder.path, _vocab_size(folder), _media_tokens(folder.config))
    numbers = empty_numbers(prompts=int(batch.input_ids.shape[0]), tokens=batch.tokens, token_source=batch.source)
    try:
        model = load_model(folder.path, device, allow_pickle=allow_pickle)
        try:
            merged = logits_of(model, batch, device)
        except Exception as exc:
            if _runs_on_text(folder.config):
                raise
            # a VLM that needs its images even for text: its not running says nothing about the merge
            return not_checked("forward", f"the model loads but does not run on text alone, without images "
                               f"({type(exc).__name__}: {exc})", numbers, time.perf_counter() - started)
    except IncompleteModel as exc:
        failure = Finding(str(exc), tensor=exc.tensor)
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    except MergeError as exc:   # with --allow-pickle: a pickle file that asks for more than tensors
        failure = Finding(exc.what, file=os.path.basename(exc.file or "") or None)
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    except Exception as exc:   # any other failure to load or run is the finding
        failure = Finding(f"transformers cannot run the merged model: {type(exc).__name__}: {exc}")
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    failures: list[Finding] = []
    nonfinite = int((~torch.isfinite(merged)).sum())
    numbers.update(logits_finite=nonfinite == 0, merged_loss=number(batch_loss(merged, batch)))
    if nonfinite:
        failures.append(Finding(f"{nonfinite} of {merged.numel()} logits are NaN or Inf"))
    numbers["inputs"], reference, identical = _run_inputs(input_models(spec, plan), batch, device, allow_pickle)
    compared, unchecked = _against_inputs(merged, reference, identical, spec, plan, plan_problem,
                                          _output_dtype(folder), numbers)
    failures += compared
    summary = _summary(numbers)
    if unchecked and not failures:
        return not_checked("forward", f"{unchecked}; {summary}", numbers, time.perf_counter() - started)
    return outcome("forward", failures, summary, numbers, time.perf_counter() - started)


def _against_inputs(merged: torch.Tensor, reference: Optional[tuple[str, torch.Tensor]], identical: bool,
                    spec: Optional[Spec], plan: Optional[MergePlan], plan_problem: Optional[str],
                    dtype: torch.dtype, numbers: dict[str, Any]) -> tuple[list[Finding], Optional[str]]:
    """(findings, why the comparison with the inputs could not be made). The merged model must compute what
    its inputs compute when they are identical and the method gives back its input on identical inputs."""
    if spec is None:
        return [], None   # a plain model folder: there are no inputs
    identity = _identity_on_identical_inputs(spec, plan)
    missing = next((entry for entry in numbers["inputs"] if entry["loss"] is None), None)
    if missing is not None:
        if identity is False:
            return [], None   # the inputs' losses are context only for this merge
        who = f"{missing['model']} could not be run ({missing['note']})"
        if len(numbers["inputs"]) == 1:
            return [], f"the merge should compute what its input computes, but {who}"
        return [], f"cannot compare with the inputs: {who}, so whether the merge must equal them is unknown"
    if not identical:
        return [], None       # different inputs: nothing to be equal to
    if identity and _shared_tied_fold(spec):
        return [], None       # no reference: see _shared_tied_fold
    if identity:
        return _compare(merged, reference, dtype, numbers), None
    if identity is None:
        why = plan_problem or "the method could not be probed on a small tensor"
        return [], f"the inputs compute the same logits, but whether this merge should too is unknown ({why})"
    return [], None


def _shared_tied_fold(spec: Spec) -> bool:
    """Whether an input folds adapters with ``tied_embeddings: shared``: the fold then changes the one tensor
    that is both the embedding and lm_head, as peft's merge_and_unload does, which on purpose computes
    something else than the adapter applied at inference time, so that is no reference to equal."""
    refs = [entry.ref for entry in spec.all_models()] + ([spec.base_model] if spec.base_model else [])
    return any(ref.adapters and ref.tied_embeddings == "shared" for ref in refs)


def _run_inputs(models: list[InputModel], batch, device: torch.device, allow_pickle: bool
                ) -> tuple[list[dict[str, Any]], Optional[tuple[str, torch.Tensor]], bool]:
    """Each input's loss on the batch ({model, loss, note}); (label, logits) of the first input; whether all
    inputs ran and computed bit-identical logits (a merge of identical inputs, or a single input)."""
    from .inference import PickleRefused, batch_loss, load_model, logits_of

    entries: list[dict[str, Any]] = []
    reference, identical = None, True
    for model in models:
        entry: dict[str, Any] = {"model": model.label, "loss": None, "note": model.problem}
        if model.folder is not None:
            try:
                logits = logits_of(load_model(model.folder, device, model.adapters, allow_pickle=allow_pickle),
                                   batch, device)
                entry["loss"] = number(batch_loss(logits, batch))
                if reference is None:
                    reference = (model.label, logits)
                elif not torch.equal(reference[1], logits):
                    identical = False
            except (PickleRefused, MergeError) as exc:
                entry["note"] = exc.what if isinstance(exc, MergeError) else str(exc)
            except Exception as exc:   # an input transformers cannot run: its loss is missing, with the reason
                entry["note"] = f"{type(exc).__name__}: {exc}"
        identical = identical and entry["loss"] is not None
        entries.append(entry)
    return entries, reference, identical and reference is not None


def input_models(spec: Optional[Spec], plan: Optional[MergePlan]) -> list[InputModel]:
    """The spec's models (base first), each with its folder and adapters, in the order they are reported."""
    if spec is None:
        return []
    refs: dict[ModelRef, str] = {}
    if spec.base_model is not None:
        refs[spec.base_model] = "base_model"
    for entry in spec.all_models():
        refs.setdefault(entry.ref, entry.where)
    for piece in spec.slices or ():
        for source in piece.sources:
            refs.setdefault(source.ref, source.where)
    return [_resolve(ref, where, plan) for ref, where in refs.items()]


def _resolve(ref: ModelRef, where: str, plan: Optional[MergePlan]) -> InputModel:
    try:
        opened = plan.checkpoints.get(ref) if plan is not None and not ref.adapters else None
        folder = opened.folder if opened is not None else fetch(ref.model, where)
        adapters = tuple((_adapter_folder(adapter.path, where), adapter.weight) for adapter in ref.adapters)
        return InputModel(str(ref), folder, adapters)
    except MergeError as exc:
        return InputModel(str(ref), None, problem=exc.what)


def _adapter_folder(path: ModelPath, where: str) -> str:
    from ..plan.inputs import fetch

    return fetch(path, where, patterns=ADAPTER_PATTERNS)


def _identity_on_identical_inputs(spec: Optional[Spec], plan: Optional[MergePlan]) -> Optional[bool]:
    """Does this merge give back its input when all inputs are the same model? Probed per planned tensor
    with the strategy itself on a small tensor: true for averages, task arithmetic, TIES, SLERP, a fold;
    false for a linear merge with normalize: false and weights that do not sum to 1, or for layer stacking.
    None: cannot tell (no plan, or a strategy that needs real shapes)."""
    if spec is not None and spec.slices is not None:
        return False
    if spec is None or plan is None:
        return None
    probe = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    for job in plan.jobs:
        if job.copy:
            continue
        ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
        inputs = [probe.clone() for _ in job.inputs]
        try:
            result = job.strategy(inputs, probe.clone() if job.base is not None else None, ctx, **job.params)
        except (RuntimeError, ValueError):   # a strategy that needs real shapes: no claim either way
            return None
        if tuple(result.shape) != tuple(probe.shape) or not torch.allclose(result, probe, rtol=1e-5, atol=1e-6):
            return False
    return True


def _compare(merged: torch.Tensor, reference: tuple[str, torch.Tensor], dtype: torch.dtype,
             numbers: dict[str, Any]) -> list[Finding]:
    label, logits = reference
    rtol = max(8 * torch.finfo(dtype).eps, 1e-4)
    tolerance = rtol * max(1.0, float(logits.abs().max()))
    difference = float((merged - logits).abs().max())
    numbers.update(compared_with=label, max_logit_diff=number(difference), logit_tolerance=tolerance)
    if not difference <= tolerance:
        return [Finding(f"logits differ from {label}'s by up to {difference:.3g} (tolerance {tolerance:.3g}), "
                        "though the merge should compute what that input computes")]
    return []


def _cannot_run(folder: OutputFolder, device: torch.device, allow_pickle: bool) -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: pip install 'mergekit-lite[validate]'"
    if not folder.config:
        return "no config.json: transformers cannot build the model"
    from .inference import TRUST_REMOTE_CODE, available_memory, refusal, unknown_architecture

    own_code = bool(folder.config.get("auto_map"))
    if own_code and not TRUST_REMOTE_CODE.get():   # run by run_merge(trust_remote_code=True) only
        return "the model needs its own code (auto_map in config.json), which validation does not run"
    if folder.pickle_only and not allow_pickle:
        return refusal(folder.pickles)
    unknown = None if own_code else unknown_architecture(folder.config)   # its own code knows its model_type
    if unknown:
        return unknown
    values = sum(info.numel for info in folder.tensors.values())
    values += sum(os.path.getsize(os.path.join(folder.path, name)) // 2 for name in folder.pickles)   # >= 16-bit
    need = int(MEMORY_MARGIN * 4 * values)
    free = available_memory(device)
    if free is not None and need > free:
        return (f"the model needs about {format_size(need)} in float32 on {device.type}, "
                f"{format_size(free)} is free")
    return None


def _vocab_size(folder: OutputFolder) -> int:
    vocab = folder.config.get("vocab_size") or folder.config.get("text_config", {}).get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    head = folder.tensors.get("lm_head.weight")
    return head.shape[0] if head is not None else 2


def _runs_on_text(config: dict[str, Any]) -> bool:
    """A causal LM runs on token ids alone; an image-text-to-text model (a VLM) may not."""
    from .inference import auto_class

    return auto_class(config).__name__ == "AutoModelForCausalLM"


def _media_tokens(config: dict[str, Any]) -> list[int]:
    """A multimodal model's placeholder token ids (image, video, audio): never fed without their media."""
    keys = [key for key in config if key.endswith(("_token_index", "_token_id")) and
            key.startswith(("image", "video", "audio", "boi", "eoi", "vision"))]
    return [config[key] for key in keys if type(config[key]) is int]


def _output_dtype(folder: OutputFolder) -> torch.dtype:
    """The dtype holding most of the output's float bytes."""
    sizes: dict[torch.dtype, int] = {}
    for info in folder.tensors.values():
        if info.dtype.is_floating_point:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def empty_numbers(**known: Any) -> dict[str, Any]:
    numbers: dict[str, Any] = {"prompts": 0, "tokens": 0, "token_source": None, "logits_finite": None,
                               "merged_loss": None, "inputs": [], "compared_with": None, "max_logit_diff": None,
                               "logit_tolerance": None}
    numbers.update(known)
    return numbers


def _summary(numbers: dict[str, Any]) -> str:
    def loss(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    losses = ", ".join([f"merged {loss(numbers['merged_loss'])}"] +
                       [f"{entry['model']} {loss(entry['loss'])}" for entry in numbers["inputs"]])
    text = (f"logits finite; loss on {numbers['prompts']} prompts ({numbers['tokens']} tokens, "
            f"{numbers['token_source'].replace('_', ' ')}): {losses}")
    if numbers["compared_with"] is not None:
        text += (f"; same as {numbers['compared_with']}: max |logit diff| {numbers['max_logit_diff']:.3g} "
                 f"<= {numbers['logit_tolerance']:.3g}")
    return text
