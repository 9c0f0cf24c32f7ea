"""The MoE layout (`merge moe`): which output tensors a mixture of experts has and where each comes from.

mergekit-moe's output formats (mergekit/moe/{mixtral,qwen,qwen3}.py), for transformers 5:
- everything outside the layers' MLPs comes from ``base_model`` as it is;
- Mixtral and Qwen3-MoE: per layer ``mlp.experts.gate_up_proj`` (experts, 2 x intermediate, hidden): each
  expert's gate_proj rows then its up_proj rows; ``mlp.experts.down_proj`` (experts, hidden, intermediate);
- Qwen2-MoE: per layer and expert ``mlp.experts.E.{gate,up,down}_proj.weight``, the shared expert's
  ``mlp.shared_expert.*`` and its gate ``mlp.shared_expert_gate.weight`` (1, hidden); q/k/v biases the base
  lacks are zeros (Qwen2-MoE has them);
- ``mlp.gate.weight`` (experts, hidden): the router, computed from prompts (engine/router.py).
A stacked expert tensor is one source (``StackedSource``) that reads the rows of a block of experts from the
expert models, so the engine streams it like any tensor. Headers and configs only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..dtypes import parse_dtype
from ..errors import within
from ..safetensors_format import TensorInfo
from ..sources.checkpoint import Checkpoint
from ..spec.moe import Expert, MoESpec
from ..spec.references import ModelRef
from .inputs import open_reference, resolve_hub_inputs
from .jobs import Source
from .planner import MergePlan

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# output architecture -> (config model_type, class, model types of the inputs it takes)
OUTPUTS = {"mixtral": ("mixtral", "MixtralForCausalLM", ("llama", "mistral")),
           "qwen": ("qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2")),
           "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",))}
ORDER = ("mixtral", "deepseek", "qwen", "qwen3")   # mergekit's ALL_OUTPUT_ARCHITECTURES


@dataclass(frozen=True, eq=False)
class StackedSource(Source):
    """(experts, rows, cols) from each expert's (rows_k, cols) tensors, rows joined per expert in ``names``
    order; optional per-expert noise (noise_scale) and scale (residual_scale)."""

    parts: tuple[tuple[Source, ...], ...] = ()     # per expert: its tensors, joined along rows
    experts: tuple[Expert, ...] = ()
    residual: bool = False
    seed: int = 0
    dtype: Optional[torch.dtype] = None            # each part is cast to it (mergekit: .to(out_dtype)); None: as stored

    @property
    def info(self) -> TensorInfo:
        first = self.parts[0]
        rows = sum(s.info.shape[0] for s in first)
        shape = (len(self.parts), rows, first[0].info.shape[1])
        dtype = self.dtype or first[0].info.dtype
        size = torch.empty((), dtype=dtype).element_size() * shape[0] * rows * shape[2]
        return TensorInfo(self.name, dtype, shape, first[0].info.path, 0, size)

    @property
    def digest(self) -> str:
        text = repr([[f"{s.checkpoint.label}:{s.name}" for s in p] for p in self.parts]
                    + [(e.noise_scale, e.residual_scale) for e in self.experts] + [self.residual, self.seed])
        return hashlib.sha256(text.encode()).hexdigest()

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        start, end = rows or (0, len(self.parts))
        return torch.stack([self._expert(i) for i in range(start, end)])

    def _expert(self, i: int) -> torch.Tensor:
        tensor = torch.cat([source.read() for source in self.parts[i]])
        tensor = adjust(tensor, self.experts[i], self.residual, f"{self.name}:{i}", self.seed)
        return tensor.to(self.info.dtype)


@dataclass(frozen=True, eq=False)
class ExpertSource(Source):
    """One expert's tensor with its noise_scale and residual_scale (Qwen2-MoE's per-expert tensors)."""

    expert: Expert = None        # type: ignore[assignment]
    residual: bool = False
    seed: int = 0
    key: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr((self.name, self.expert.noise_scale, self.expert.residual_scale, self.residual,
                                    self.seed, self.key)).encode()).hexdigest()

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if self.expert.noise_scale is None and not (self.residual and self.expert.residual_scale is not None):
            return self.checkpoint.read(self.name, rows)
        whole = adjust(self.checkpoint.read(self.name), self.expert, self.residual, self.key, self.seed)
        return whole if rows is None else whole[rows[0]:rows[1]]


def adjust(tensor: torch.Tensor, expert: Expert, residual: bool, key: str, seed: int) -> torch.Tensor:
    """mergekit's noise_and_scale: + noise_scale * N(0, 1) (our generator: seed and tensor, not global), then
    * residual_scale on a projection back into the residual stream (down_proj)."""
    if expert.noise_scale is not None:
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:7],
                                                           "little"))
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
        tensor = tensor + noise * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


@dataclass(frozen=True, eq=False)
class RouterSource(Source):
    """A router computed from prompts (engine/router.py) before anything is written; float32 (routers, layer)."""

    routers: dict = None         # type: ignore[assignment]   # "experts"/"shared" -> (layers, n, hidden) tensor
    kind: str = "experts"
    layer: int = 0
    shape: tuple[int, ...] = ()

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, torch.float32, self.shape, "", 0, 4 * self.shape[0] * self.shape[1])

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        tensor = self.routers[self.kind][self.layer]
        return tensor if rows is None else tensor[rows[0]:rows[1]]


@dataclass(frozen=True, eq=False)
class ZeroSource(Source):
    """A Qwen2-MoE attention bias the base model has not: zeros, as mergekit writes."""

    shape: tuple[int, ...] = ()

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, torch.float32, self.shape, "", 0, 4 * self.shape[0])

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        start, end = rows or (0, self.shape[0])
        return torch.zeros(end - start)


@dataclass
class MoEPlan(MergePlan):
    moe: Optional[MoESpec] = None
    output: str = ""                        # mixtral, qwen or qwen3
    routers: dict = dataclasses.field(default_factory=dict)   # filled by engine/router.py before writing
    layers: int = 0


def open_moe_inputs(spec: MoESpec, opened: ExitStack, allow_pickle: bool = False) -> dict[ModelRef, Checkpoint]:
    refs = spec.references()
    with within(spec.file):
        hub = resolve_hub_inputs(refs)
    checkpoints = {}
    for ref, where in refs:
        with within(spec.file, where):
            checkpoints[ref] = open_reference(ref, where, hub, allow_pickle)
        opened.callback(checkpoints[ref].close)
    return checkpoints


def choose_output(spec: MoESpec, model_type: str) -> str:
    """mergekit's select_output_arch: the architectures ``architecture:`` names (a prefix), those supporting the
    config, Mixtral first."""
    named = [a for a in ORDER if spec.architecture is None or a.startswith(spec.architecture.lower())]
    if "deepseek" in named and (spec.architecture or "").lower().startswith("deepseek"):
        raise spec.error("DeepSeek MoE output is not supported: it needs DeepSeek's own modelling code "
                         "(trust_remote_code), which merge moe does not write", where="architecture",
                         hint="use architecture: mixtral (Llama/Mistral experts), qwen (with one shared expert) "
                              "or qwen3 (Qwen3 experts)")
    reasons = []
    for name in (a for a in named if a in OUTPUTS):
        problem = _unsupported(spec, name, model_type)
        if problem is None:
            return name
        reasons.append(f"{name}: {problem}")
    raise spec.error("no MoE output architecture fits these models: " + "; ".join(reasons),
                     where="architecture" if spec.architecture else "base_model",
                     hint="mixtral takes Llama/Mistral models and no shared experts; qwen takes Llama/Mistral/Qwen2 "
                          "models and exactly one shared expert; qwen3 takes Qwen3 models and no shared experts")


def _unsupported(spec: MoESpec, name: str, model_type: str) -> Optional[str]:
    if model_type not in OUTPUTS[name][2]:
        return f"takes {'/'.join(OUTPUTS[name][2])} models, not {model_type}"
    if name == "qwen":
        if len(spec.shared_experts) != 1:
            return "needs exactly one shared expert"
        if spec.gate_mode != "random" and not spec.shared_experts[0].positive_prompts:
            return "the shared expert needs positive_prompts for its gate (or gate_mode: random)"
    elif spec.shared_experts:
        return "takes no shared experts"
    return None


def output_dtype(spec: MoESpec, config: dict[str, Any]) -> Optional[torch.dtype]:
    """mergekit's select_dtype: the file's dtype, else the base config's, else as stored."""
    if spec.dtype is not None:
        return spec.dtype
    for key in ("torch_dtype", "dtype"):
        if isinstance(config.get(key), str):
            try:
                return parse_dtype(config[key])
            except ValueError:
                pass
    return None
