"""Check 4, forward pass: the merged model loads in transformers and runs; its loss sits beside its inputs'.

The merged model runs a fixed batch (the output's tokenizer on fixed prompts, else fixed token ids; a VLM runs as
image-text-to-text on that text alone, never fed its image tokens): its
logits must be finite, and every tensor must be filled from the files. Each input model runs the same
batch, so the report shows each input's loss beside the merged model's. When the output is supposed to
compute what one input computes, their logits are compared: a merge of identical inputs by a method that
is the identity on identical inputs, and a LoRA fold (one input ``base+adapter``), whose reference is the
base with the adapter applied at inference time by peft (``inference.apply_adapters``). A mixture of experts
(`merge moe`) is compared with the dense model its MoE file proves it computes, if any (moe_forward.py).

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
from .experts import ExpertsUnsupported
from .folder import OutputFolder
from .report import CheckResult, Finding, not_checked, number, outcome

WHOLE_SLACK = 300 * 2**20   # the merge's memory bound: (inputs + 2) x its largest float32 tensor + this
ADAPTER_PATTERNS = ("adapter_config.json", "*.safetensors")


@dataclass(frozen=True)
class InputModel:
    label: str                              # as the spec wrote it
    folder: Optional[str]                   # None when it cannot be found (then ``problem`` says why)
    adapters: tuple[tuple[str, float], ...] = ()
    problem: Optional[str] = None


def check_forward(folder: OutputFolder, spec: Optional[Spec], plan: Optional[MergePlan], device: torch.device, *,
                  allow_pickle: bool = False, plan_problem: Optional[str] = None, context_inputs: bool = True,
                  moe: bool = False, tally=None) -> CheckResult:
    """Passed, failed, or not checked with the reason: transformers missing, no config.json, custom code, an unknown
    architecture, pickle weights without ``allow_pickle``, a model that cannot run layer by layer and is too large to
    load whole (inference.open_model), or (with a spec) an input the merge should equal that could not be run.
    ``context_inputs``: run every input for its loss (context); without it only the input the merge must equal runs
    (``_needed_inputs``), the others listed as not run, saying why. ``moe``: a mixture of experts (moe_forward.py);
    ``tally`` (finite.FiniteTally) counts NaN and Inf in the merged model's tensors as they are read."""
    started = time.perf_counter()
    reason = _cannot_run(folder, device, allow_pickle)
    if reason:
        return not_checked("forward", reason, empty_numbers(), time.perf_counter() - started)
    from .inference import IncompleteModel, batch_loss, logits_of, make_batch
    from .streamed import TooLargeWhole, open_model
    from .vocab_forward import shared_tokens

    batch = make_batch(folder.path, _vocab_size(folder), _media_tokens(folder.config))
    models = input_models(spec, plan)
    shared = shared_tokens(plan, models)   # a tokenizer merge changed the ids: compare on the shared tokens
    batch = shared.batch(batch) if shared is not None else batch
    numbers = empty_numbers(prompts=int(batch.input_ids.shape[0]), tokens=batch.tokens, token_source=batch.source)
    limit = _memory_bound(folder, spec)
    try:
        model = open_model(folder.path, device, allow_pickle=allow_pickle, whole_limit=limit, tally=tally)
        try:
            merged = logits_of(model, batch, device)
        except Exception as exc:
            if _runs_on_text(folder.config):
                raise
            # a VLM that needs its images even for text: its not running says nothing about the merge
            return not_checked("forward", f"the model loads but does not run on text alone, without images "
                               f"({type(exc).__name__}: {exc})", numbers, time.perf_counter() - started)
    except (TooLargeWhole, ExpertsUnsupported) as exc:
        return not_checked("forward", f"the merged model: {exc}", numbers, time.perf_counter() - started)
    except IncompleteModel as exc:
        failure = Finding(str(exc), tensor=exc.tensor)
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    except MergeError as exc:   # with --allow-pickle: a pickle file that asks for more than tensors
        failure = Finding(exc.what, file=os.path.basename(exc.file or "") or None)
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    except Exception as exc:   # any other failure to load or run is the finding
        failure = Finding(f"transformers cannot run the merged model: {type(exc).__name__}: {exc}")
        return outcome("forward", [failure], "", numbers, time.perf_counter() - started)
    nonfinite = int((~torch.isfinite(merged)).sum())
    numbers.update(logits_finite=nonfinite == 0, merged_loss=number(batch_loss(merged, batch)))
    failures = [Finding(f"{nonfinite} of {merged.numel()} logits are NaN or Inf")] if nonfinite else []
    identity = _identity_on_identical_inputs(spec, plan) if spec is not None else None
    numbers["inputs"], reference, identical, attempted = _inputs(models, identity, shared, batch, device,
                                                                 allow_pickle, limit, context_inputs)
    merged = shared.restrict(merged) if shared is not None else merged
    compared, unchecked = _against_inputs(merged, reference, identical, identity, spec, plan_problem,
                                          _output_dtype(folder), numbers, attempted)
    if moe:   # a mixture of experts (merge moe): no merge inputs; a dense model it must equal, if any
        compared, unchecked = _moe_twin(folder, merged, batch, device, allow_pickle, limit, context_inputs, numbers)
    failures += compared
    summary = _summary(numbers)
    if unchecked and not failures:
        return not_checked("forward", f"{unchecked}; {summary}", numbers, time.perf_counter() - started)
    return outcome("forward", failures, summary, numbers, time.perf_counter() - started)


def _inputs(models: list[InputModel], identity: Optional[bool], shared, batch, device: torch.device,
            allow_pickle: bool, limit: int, context_inputs: bool
            ) -> tuple[list[dict[str, Any]], Optional[tuple[str, torch.Tensor]], bool, list[dict[str, Any]]]:
    """(entries, reference, identical, attempted): every input with ``context_inputs``, else only those needed
    (``_needed_inputs``); after a tokenizer merge that changed the ids (``shared``), each input that runs does so
    on its own ids of the tokens it shares with the output (vocab_forward.py)."""
    if context_inputs:
        entries, reference, identical = _run_inputs(models, batch, device, allow_pickle, limit, shared)
        return entries, reference, identical, entries
    return _needed_inputs(models, identity, batch, device, allow_pickle, limit, shared)


def _against_inputs(merged: torch.Tensor, reference: Optional[tuple[str, torch.Tensor]], identical: bool,
                    identity: Optional[bool], spec: Optional[Spec], plan_problem: Optional[str],
                    dtype: torch.dtype, numbers: dict[str, Any], attempted: list[dict[str, Any]]
                    ) -> tuple[list[Finding], Optional[str]]:
    """(findings, why the comparison with the inputs could not be made). The merged model must compute what
    its inputs compute when they are identical and the method gives back its input on identical inputs.
    ``attempted``: the entries of the inputs that were to run (the others were not needed)."""
    if spec is None:
        return [], None   # a plain model folder: there are no inputs
    missing = next((entry for entry in attempted if entry["loss"] is None), None)
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


def _moe_twin(folder: OutputFolder, merged: torch.Tensor, batch, device: torch.device, allow_pickle: bool,
              limit: int, context_inputs: bool, numbers: dict[str, Any]) -> tuple[list[Finding], Optional[str]]:
    """A mixture of experts: compared with the dense model its spec proves it computes (moe_forward.py), else
    the base model's loss beside its own, as context."""
    from .moe_forward import dense_reference

    numbers["inputs"], reference, unchecked = dense_reference(folder, batch, device, allow_pickle, limit,
                                                              context_inputs, NOT_RUN)
    if reference is None:
        return [], unchecked
    label, why, logits = reference
    return _compare(merged, (label, logits), _output_dtype(folder), numbers, f"though {why}, so the MoE must "
                    "compute what that dense model computes, whatever its routers"), None


def _shared_tied_fold(spec: Spec) -> bool:
    """Whether an input folds adapters with ``tied_embeddings: shared``: the fold then changes the one tensor
    that is both the embedding and lm_head, as peft's merge_and_unload does, which on purpose computes
    something else than the adapter applied at inference time, so that is no reference to equal."""
    refs = [entry.ref for entry in spec.all_models()] + ([spec.base_model] if spec.base_model else [])
    return any(ref.adapters and ref.tied_embeddings == "shared" for ref in refs)


def _run_inputs(models: list[InputModel], batch, device: torch.device, allow_pickle: bool, limit: int,
                shared=None) -> tuple[list[dict[str, Any]], Optional[tuple[str, torch.Tensor]], bool]:
    """Each input's loss on the batch ({model, loss, note}); (label, logits) of the first input; whether all
    inputs ran and computed bit-identical logits (a merge of identical inputs, or a single input). After a
    tokenizer merge that changed the ids (``shared``, vocab_forward.py), each input runs on its own ids of the
    batch's tokens and its logits are taken at the tokens it shares with the output."""
    from . import inference
    from .inference import PickleRefused, batch_loss
    from .streamed import TooLargeWhole, open_model

    entries: list[dict[str, Any]] = []
    reference, identical = None, True
    for model in models:
        entry: dict[str, Any] = {"model": model.label, "loss": None, "note": model.problem}
        own = batch if shared is None else shared.batch_for(model.label, batch)
        if model.folder is not None and own is None:
            entry["note"] = shared.UNMATCHED
        elif model.folder is not None:
            try:
                opened = open_model(model.folder, device, model.adapters, allow_pickle=allow_pickle,
                                    whole_limit=limit)
                logits = inference.logits_of(opened, own, device)
                entry["loss"] = number(batch_loss(logits, own))
                if shared is not None:
                    entry["note"] = shared.note
                    logits = shared.at_shared(model.label, logits)
                if reference is None:
                    reference = (model.label, logits)
                elif not torch.equal(reference[1], logits):
                    identical = False
            except (PickleRefused, TooLargeWhole, ExpertsUnsupported, MergeError) as exc:
                entry["note"] = exc.what if isinstance(exc, MergeError) else str(exc)
            except Exception as exc:   # an input transformers cannot run: its loss is missing, with the reason
                entry["note"] = f"{type(exc).__name__}: {exc}"
        identical = identical and entry["loss"] is not None
        entries.append(entry)
    return entries, reference, identical and reference is not None


NOT_RUN = "not run: "   # the note of an input the default after-merge validation did not need


def _needed_inputs(models: list[InputModel], identity: Optional[bool], batch, device: torch.device,
                   allow_pickle: bool, limit: int, shared=None
                   ) -> tuple[list[dict[str, Any]], Optional[tuple[str, torch.Tensor]], bool, list[dict[str, Any]]]:
    """As ``_run_inputs``, running only what the check can fail by: the input the merge must equal (a single
    input, a LoRA fold's base with its adapters, or one of identical inputs when the method gives back its input
    on identical inputs). Whether the inputs are identical is read from their files (same_inputs.py), not run.
    Also returns the entries of the inputs that were to run."""
    def skipped(why: str) -> list[dict[str, Any]]:
        return [{"model": m.label, "loss": None, "note": NOT_RUN + why} for m in models]

    if identity is False or not models:
        return skipped("the merge need not compute what an input computes, so its loss is context only "
                       "(`merge validate` computes it)"), None, False, []
    lost = [m for m in models if m.folder is None]
    if len(models) == 1 or lost or any(m.adapters for m in models):
        entries, reference, identical = _run_inputs(models, batch, device, allow_pickle, limit, shared)
        return entries, reference, identical, entries
    from .same_inputs import same_weights

    same = same_weights([m.folder for m in models])
    if same is None:   # the files cannot tell: run them, as `merge validate` does
        entries, reference, identical = _run_inputs(models, batch, device, allow_pickle, limit, shared)
        return entries, reference, identical, entries
    if not same:
        return skipped("the inputs' weights differ, so the merge need not equal any of them; its loss is context "
                       "only (`merge validate` computes it)"), None, False, []
    entries, reference, identical = _run_inputs(models[:1], batch, device, allow_pickle, limit, shared)
    rest = [{"model": m.label, "loss": None, "note": NOT_RUN + f"its weights are {models[0].label}'s, byte for byte, "
             "so it computes the same logits"} for m in models[1:]]
    return entries + rest, reference, identical, entries


def input_models(spec: Optional[Spec], plan: Optional[MergePlan]) -> list[InputModel]:
    """The spec's models (base first), each with its folder and adapters, in the order they are reported."""
    return [_resolve(ref, where, plan) for ref, where in _references(spec).items()]


def _references(spec: Optional[Spec]) -> dict[ModelRef, str]:
    """The spec's models (base first), each with where the spec names it."""
    if spec is None:
        return {}
    refs: dict[ModelRef, str] = {}
    if spec.base_model is not None:
        refs[spec.base_model] = "base_model"
    for entry in spec.all_models():
        refs.setdefault(entry.ref, entry.where)
    for piece in spec.all_slices():
        for source in piece.sources:
            refs.setdefault(source.ref, source.where)
    return refs


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
    if spec is not None and spec.all_slices():   # layer stacking (slices:, or inside a module)
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
             numbers: dict[str, Any], why: str = "though the merge should compute what that input computes"
             ) -> list[Finding]:
    label, logits = reference
    rtol = max(8 * torch.finfo(dtype).eps, 1e-4)
    tolerance = rtol * max(1.0, float(logits.abs().max()))
    difference = float((merged - logits).abs().max())
    numbers.update(compared_with=label, max_logit_diff=number(difference), logit_tolerance=tolerance)
    if not difference <= tolerance:
        return [Finding(f"logits differ from {label}'s by up to {difference:.3g} (tolerance {tolerance:.3g}), "
                        + why)]
    return []


def _cannot_run(folder: OutputFolder, device: torch.device, allow_pickle: bool) -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: pip install 'mergekit-lite[validate]'"
    if not folder.config:
        return "no config.json: transformers cannot build the model"
    from .inference import TRUST_REMOTE_CODE, refusal, unknown_architecture

    own_code = bool(folder.config.get("auto_map"))
    if own_code:
        reason = _own_code_problem(folder, TRUST_REMOTE_CODE.get())
        if reason:
            return reason
    if folder.pickle_only and not allow_pickle:
        return refusal(folder.pickles)
    unknown = None if own_code else unknown_architecture(folder.config)   # its own code knows its model_type
    return unknown or None


def _memory_bound(folder: OutputFolder, spec: Optional[Spec]) -> int:
    """The merge's memory bound, from the tensors: (inputs + 2) x the largest tensor in float32 + 300 MB. A model
    that runs layer by layer holds one module at a time, well within it; one that must load whole may use it."""
    inputs = max(1, len(_references(spec)))
    largest = max((info.numel for info in folder.tensors.values()), default=0)
    return (inputs + 2) * 4 * largest + WHOLE_SLACK


def _own_code_problem(folder: OutputFolder, trusted: bool) -> Optional[str]:
    """Why the forward check cannot run a model whose code is its own (config.json's ``auto_map``): it runs that
    code only when the user said so (``--trust-remote-code``), and only from files in the folder."""
    from ..output.remote_code import code_modules

    local, _ = code_modules(folder.config["auto_map"])
    files = ", ".join(sorted(module + ".py" for module in local)) or "auto_map"
    if not trusted:
        return (f"the model needs its own code ({files}, named by auto_map in config.json), which runs only with "
                "--trust-remote-code (trust_remote_code=True): read that code first, then add the flag")
    missing = [name for name in sorted(module + ".py" for module in local)
               if not os.path.isfile(os.path.join(folder.path, name))]
    if missing:
        return (f"config.json's auto_map names {', '.join(missing)}, which is not in the folder: merge again with "
                "--trust-remote-code to copy the model's code, or add the files")
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

    shown = [entry for entry in numbers["inputs"] if not (entry["note"] or "").startswith(NOT_RUN)]
    losses = ", ".join([f"merged {loss(numbers['merged_loss'])}"] +
                       [f"{entry['model']} {loss(entry['loss'])}" for entry in shown])
    if len(shown) < len(numbers["inputs"]):
        notes = dict.fromkeys(entry["note"].removeprefix(NOT_RUN) for entry in numbers["inputs"]
                              if entry not in shown)
        losses += f"; {len(numbers['inputs']) - len(shown)} input(s) not run: {'; '.join(notes)}"
    text = (f"logits finite; loss on {numbers['prompts']} prompts ({numbers['tokens']} tokens, "
            f"{numbers['token_source'].replace('_', ' ')}): {losses}")
    if numbers["compared_with"] is not None:
        text += (f"; same as {numbers['compared_with']}: max |logit diff| {numbers['max_logit_diff']:.3g} "
                 f"<= {numbers['logit_tolerance']:.3g}")
    return text
