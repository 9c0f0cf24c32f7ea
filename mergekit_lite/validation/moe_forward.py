"""The forward check on a mixture of experts (`merge moe`): the dense model its spec proves it computes.

A Mixtral or Qwen3-MoE layer computes the sum, over the experts a token is routed to, of w_e * MLP_e(x), with
the routing weights w renormalised over the chosen experts (Mixtral always; Qwen3-MoE with ``norm_topk_prob``,
which `merge moe` and mergekit-moe write; or every expert chosen), so they sum to 1. When every expert is the
same model, unchanged (no ``noise_scale``, no ``residual_scale``), every MLP_e is that model's MLP: whatever the
routers say, the layer computes MLP(x), and the MoE computes what the dense model made of the base's attention,
norms and embeddings and that expert's MLPs computes (up to the rounding of the weights to the output dtype and
of the weights' sum). That dense model is the expert itself when the expert is the base model; else the base
run layer by layer with the expert's ``gate_proj``/``up_proj``/``down_proj`` read in place of its own
(``SwappedMLPs`` in streamed.py's reader). A single expert is the simplest case of this.

Not provable, so not compared: different experts; noise or residual scaling; a shared expert (Qwen2-MoE adds
sigmoid(gate . x) * shared(x), its gate computed from prompts); routing weights that are not renormalised; a base
sliding window shorter than the batch (the MoE has none); base MLP tensors the MoE drops (biases); experts with
adapters. Then the base model runs for its loss, as context, in `merge validate`; after `merge moe`
(``context_inputs=False``) it is listed as not run, saying why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import MergeError
from ..plan.moe import MLP, PROJECTIONS
from ..spec.moe import MoESpec
from ..spec.references import ModelRef
from .folder import OutputFolder

SPEC_FILE = "mergekit_config.yml"


@dataclass(frozen=True)
class DenseTwin:
    """The dense model a MoE must compute: ``base`` with ``expert``'s MLPs (``expert`` None: ``base`` as it is)."""
    label: str
    base: str
    expert: Optional[str]
    why: str                 # why the MoE must compute what it computes


def dense_reference(folder: OutputFolder, batch, device: torch.device, allow_pickle: bool, limit: int,
                    context_inputs: bool, not_run: str
                    ) -> tuple[list[dict[str, Any]], Optional[tuple[str, str, torch.Tensor]], Optional[str]]:
    """(input entries for the report, (label, why, logits) of the dense model the MoE must equal, or None; why
    the comparison that should be made could not be). ``not_run``: forward.py's prefix of a note of a model that
    did not run."""
    try:
        spec = _read_spec(folder)
    except MergeError as exc:
        return [], None, f"cannot read the MoE's {SPEC_FILE}: {exc.what}"
    try:
        twin, why_not = dense_twin(spec, folder.config, int(batch.input_ids.shape[1]))
    except MergeError as exc:   # a model that cannot be found
        one = len({e.ref for e in spec.experts}) == 1 and not _not_provable(spec, folder.config)
        return [], None, (f"the MoE should compute what a dense model computes (its experts are one model), but "
                          f"{exc.what}" if one else f"cannot compare with the experts: {exc.what}, so whether the MoE "
                          "must compute what a dense model computes is unknown")
    if twin is not None:
        entry: dict[str, Any] = {"model": twin.label, "loss": None, "note": None}
        try:
            logits = _run(twin, batch, device, allow_pickle, limit)
        except Exception as exc:   # the dense model cannot run: the comparison the spec calls for is not made
            note = exc.what if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
            entry["note"] = note
            return [entry], None, f"the MoE should compute what {twin.label} computes ({twin.why}), but that " \
                                  f"model could not be run ({note})"
        from .inference import batch_loss

        entry["loss"] = float(batch_loss(logits, batch))
        return [entry], (twin.label, twin.why, logits), None
    base = str(spec.base_model)
    if not context_inputs:
        note = (f"{not_run}the MoE need not compute what a dense model computes ({why_not}), so the base's loss is "
                "context only (`merge validate` computes it)")
        return [{"model": base, "loss": None, "note": note}], None, None
    return [_context_entry(spec, why_not, batch, device, allow_pickle, limit)], None, None


def _read_spec(folder: OutputFolder) -> MoESpec:
    """The output's MoE file, its relative paths made absolute against the folder `merge moe` ran in (from
    merge_run.json), else the current folder."""
    from ..output.run_settings import read_run_settings
    from ..spec.moe import load_moe
    from .record import rebase

    spec = load_moe(os.path.join(folder.path, SPEC_FILE))
    try:
        settings = read_run_settings(folder.path)
    except MergeError:
        settings = None
    base = (settings.working_dir if settings is not None else None) or os.getcwd()
    return rebase(spec, base)


def dense_twin(spec: MoESpec, config: dict[str, Any], tokens: int) -> tuple[Optional[DenseTwin], str]:
    """(the dense model the MoE provably computes, ""), or (None, why nothing is provable). Raises MergeError
    when a model it needs cannot be found."""
    why = _not_provable(spec, config)
    if why:
        return None, why
    from .same_inputs import same_weights

    expert = spec.experts[0]
    base_folder = _folder(spec.base_model, "base_model")
    folders = [_folder(e.ref, f"{e.where}.source_model") for e in spec.experts]
    expert_folder, window = folders[0], _sliding_window(base_folder)
    if any(e.ref != expert.ref for e in spec.experts) and same_weights(folders) is not True:
        return None, "its experts are different models"
    if window is not None and window < tokens:
        return None, f"the base model's sliding window ({window} tokens) is shorter than the batch, the MoE has none"
    many = f"all {len(spec.experts)} experts are {expert.ref}" if len(spec.experts) > 1 else f"its one expert is " \
           f"{expert.ref}"
    because = f"{many} and the routing weights sum to 1"
    if expert.ref == spec.base_model or os.path.realpath(base_folder) == os.path.realpath(expert_folder):
        return DenseTwin(str(expert.ref), base_folder, None, because), ""
    return DenseTwin(f"{spec.base_model} with {expert.ref}'s MLPs", base_folder, expert_folder, because), ""


def _not_provable(spec: MoESpec, config: dict[str, Any]) -> str:
    """Why the spec and config.json do not make the MoE a dense model; "" when they do (given one expert model)."""
    if spec.shared_experts or config.get("model_type") == "qwen2_moe":
        return "a shared expert adds its output, weighted by a gate computed from prompts"
    if any(e.noise_scale is not None or e.residual_scale is not None for e in spec.experts):
        return "noise_scale or residual_scale changes the experts"
    if any(ref.adapters for ref, _ in spec.references()):
        return "a model with adapters: the dense model is not run here"
    model_type = config.get("model_type")
    experts = config.get("num_local_experts") if model_type == "mixtral" else config.get("num_experts")
    chosen = config.get("num_experts_per_tok")
    if model_type not in ("mixtral", "qwen3_moe"):
        return f"model_type {model_type!r} is not a MoE this check knows"
    if model_type == "qwen3_moe" and not config.get("norm_topk_prob") and chosen != experts:
        return "norm_topk_prob is false, so the routing weights of the chosen experts need not sum to 1"
    if experts != len(spec.experts):
        return f"config.json has {experts} experts, its {SPEC_FILE} {len(spec.experts)}"
    return ""


def _sliding_window(folder: str) -> Optional[int]:
    from ..sources.checkpoint import read_config

    config = read_config(folder)
    window = config.get("sliding_window")
    return window if type(window) is int and config.get("use_sliding_window", True) is not False else None


def _folder(ref: ModelRef, where: str) -> str:
    from ..plan.inputs import fetch

    return fetch(ref.model, where)


def _run(twin: DenseTwin, batch, device: torch.device, allow_pickle: bool, limit: int) -> torch.Tensor:
    """The dense model's logits on the batch, in float32."""
    from .inference import logits_of
    from .streamed import open_model, streamed_model

    if twin.expert is None:
        return logits_of(open_model(twin.base, device, allow_pickle=allow_pickle, whole_limit=limit), batch, device)
    swapped = SwappedMLPs.open(twin.base, twin.expert, allow_pickle)
    model = streamed_model(twin.base, device, checkpoint=swapped)
    if model is None:
        raise RuntimeError("transformers converts the base model's stored tensors while loading (beyond renaming "
                           "them), so it cannot run layer by layer with the expert's MLPs read in place of its own")
    return logits_of(model, batch, device)


class SwappedMLPs:
    """The base's tensors, with every layer's gate_proj/up_proj/down_proj weight read from the expert: what
    streamed.py needs of a sources.Checkpoint (``tensors``, ``read``, ``close``)."""

    def __init__(self, base, expert) -> None:
        self._base, self._expert = base, expert
        self.tensors = {name: expert.tensors[name] if _swapped(name) else info for name, info in base.tensors.items()}

    @classmethod
    def open(cls, base: str, expert: str, allow_pickle: bool = False) -> "SwappedMLPs":
        from ..sources.opener import open_checkpoint

        opened = open_checkpoint(base, allow_pickle=allow_pickle)
        try:
            other = open_checkpoint(expert, allow_pickle=allow_pickle)
        except BaseException:
            opened.close()
            raise
        dropped = [name for name in opened.tensors if MLP.match(name) and not _swapped(name)]
        missing = [name for name in opened.tensors if _swapped(name) and name not in other.tensors]
        if dropped or missing:
            opened.close()
            other.close()
            raise RuntimeError(f"tensor {(dropped or missing)[0]!r} " + (
                "is in the base's MLP, and the MoE has no such tensor" if dropped else "is missing from the expert"))
        return cls(opened, other)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None, out: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        return (self._expert if _swapped(name) else self._base).read(name, rows, out)

    def close(self) -> None:
        self._base.close()
        self._expert.close()


def _swapped(name: str) -> bool:
    return bool(MLP.match(name)) and name.rsplit(".", 2)[-2] in PROJECTIONS and name.endswith(".weight")


def _context_entry(spec: MoESpec, why_not: str, batch, device: torch.device, allow_pickle: bool, limit: int
                   ) -> dict[str, Any]:
    """The base model's loss beside the MoE's: context only (``note`` says why nothing is compared)."""
    from .inference import batch_loss, logits_of
    from .streamed import open_model

    entry: dict[str, Any] = {"model": str(spec.base_model), "loss": None,
                             "note": f"context only: the MoE need not compute what a dense model computes ({why_not})"}
    try:
        folder = _folder(spec.base_model, "base_model")
        model = open_model(folder, device, allow_pickle=allow_pickle, whole_limit=limit)
        entry["loss"] = float(batch_loss(logits_of(model, batch, device), batch))
    except MergeError as exc:
        entry["note"] = exc.what
    except Exception as exc:   # the base cannot run: its loss is missing, with the reason (context only)
        entry["note"] = f"{type(exc).__name__}: {exc}"
    return entry
