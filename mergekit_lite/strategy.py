"""The strategy interface: a merge method is a small pure function plus declared parameters.

A strategy gets the input tensors (float32, same shape, on the compute device), the base tensor when it
uses one, its parameters resolved for this tensor (per-model parameters as tuples aligned with the
inputs), and a small context. It returns one tensor and must not modify its inputs, read files, or touch
global random state. The parameter declarations are the single source for spec validation, for
``merge methods``, and for the README.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from .errors import SpecError


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()
FLOAT32_MAX = 3.4028234663852886e38
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Param:
    """One declared parameter: the YAML key, its type, default, range and meaning."""

    name: str
    type: type                      # float, int, bool or str (a name, e.g. concat's fallback method)
    description: str
    default: Any = REQUIRED
    per_model: bool = False         # set per input model (weight, density) rather than once per merge
    for_base: bool = True           # per-model only: does the base model take it? (mergekit's NON_BASE scope)
    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.type is bool:
            return "true/false"
        if self.type is str:
            return "a name"
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"

    def coerce(self, value: Any, where: str) -> Any:
        """Check and convert one value (YAML often gives '1e-5' as a string). Raises SpecError."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE and not isinstance(value, float):
                return text in _TRUE
            raise SpecError(f"{self.name} must be true or false, got {value!r}", where=where)
        if self.type is str:
            if isinstance(value, str) and value:
                return value
            raise SpecError(f"{self.name} must be a name, got {value!r}", where=where)
        if isinstance(value, bool):
            raise SpecError(f"{self.name} must be a number, got {value!r}", where=where)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{self.name} must be a number, got {_short(value)}", where=where) from None
        except OverflowError:   # an integer literal with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise SpecError(f"{self.name} must be a finite number, got {_short(value)}", where=where)
        if self.type is float and abs(number) > FLOAT32_MAX:
            raise SpecError(f"{self.name} = {number:g} is beyond float32's range (+-{FLOAT32_MAX:.4g})", where=where,
                            hint="merges compute in float32, where this value would be infinite")
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            raise SpecError(f"{self.name} = {number:g} is outside {self.range_text()}", where=where,
                            hint=self.description)
        if self.type is int:
            if number != int(number):
                raise SpecError(f"{self.name} must be a whole number, got {value!r}", where=where)
            return int(number)
        return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class ParamProblem:
    """What a strategy's ``check`` found wrong with one tensor's resolved parameters. ``blame`` names the
    parameters involved, so the error can give the YAML paths that set them for that tensor."""

    message: str
    blame: tuple[str, ...] = ()
    hint: Optional[str] = None
    model: Optional[int] = None   # per-model parameters: the index of the input at fault (its YAML path is named)


def weights_sum_check(params: dict[str, Any]) -> Optional[ParamProblem]:
    """``normalize`` divides by the sum of the per-model weights: a zero sum would make NaN and Inf."""
    weights = params["weight"]
    if params["normalize"] and abs(sum(weights)) < 1e-8:
        terms = " + ".join(f"{w:g}" for w in weights)
        return ParamProblem(f"the weights sum to {sum(weights):g} ({terms}), so normalize cannot divide by them",
                       ("weight", "normalize"), hint="change a weight, or set normalize: false")
    return None


@dataclass(frozen=True)
class TensorContext:
    """What a strategy may know besides the tensors: which tensor, where in depth, and its random stream."""

    name: str
    layer: Optional[int]
    t: float
    seed: int = 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from the run seed and a stable hash of the tensor name.

        The same tensor gets the same random numbers whatever the shard size, thread count or order of
        work, so random methods (DELLA) give byte-identical output across runs.
        """
        gen = torch.Generator(device=device)
        gen.manual_seed(self._key() & ((1 << 63) - 1))
        return gen

    def bits(self, model: int, chunk: int) -> np.random.PCG64DXSM:
        """Random bits for chunk ``chunk`` of model ``model``'s view of this tensor: a PCG64DXSM stream keyed
        by the run seed, the tensor name, the model and the chunk.

        Keyed per chunk, any chunk is drawn without drawing those before it, so chunks are drawn on any
        thread in any order and still give the same bits (torch's CPU generator, MT19937, only runs
        forward, and costs 6 ns a 32-bit draw against 0.9 for PCG64DXSM, NumPy's recommended PCG variant).
        NumPy keeps bit generators' and SeedSequence's streams stable across releases.
        """
        return np.random.PCG64DXSM(np.random.SeedSequence(self._key(), spawn_key=(model, chunk)))

    def _key(self) -> int:
        digest = hashlib.sha256(f"{self.seed}:{self.name}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


# inputs, base, context, **params -> merged tensor
MergeFunction = Callable[..., torch.Tensor]
BasePolicy = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class Strategy:
    """A merge method: its function, parameters, and what inputs it accepts.

    ``base``: "required" and "optional" pass the base model's tensor separately as ``base``; "input"
    treats a ``base_model`` as one more input (linear, as in mergekit).
    """

    name: str
    fn: MergeFunction
    params: tuple[Param, ...]
    summary: str
    title: str
    paper: Optional[str] = None
    base: BasePolicy = "required"
    min_inputs: int = 1                  # inputs other than a separately-passed base
    max_inputs: Optional[int] = None
    random: bool = False
    # Each output element depends only on the same element of the inputs: the engine may then merge a large
    # tensor in row blocks (bounded memory). False for anything using whole-tensor statistics (norms, top-k).
    elementwise: bool = False
    # A NaN or Inf in any input always gives a NaN or Inf in the same output element (sums, differences and
    # products with finite numbers do: w * Inf is Inf or NaN, Inf - Inf is NaN). The engine then checks only
    # the output and, when it is not finite, looks for the input to blame: one pass instead of one per input.
    propagates_nonfinite: bool = False
    # Optional: the same method written against chunks.Chunks (passes over float32 chunks of the raw inputs).
    # On the CPU the engine then runs it on every merging thread with the raw inputs in memory, instead of
    # ``fn`` on whole float32 tensors. ``fn`` must give the same bits (chunks.whole builds it from this).
    # ``chunks_when(params)`` says when it applies (default: always).
    chunked: Optional[Callable[..., None]] = field(default=None, compare=False)
    chunks_when: Optional[Callable[[dict[str, Any]], bool]] = field(default=None, compare=False)
    # Optional hook: check parameters resolved for one tensor together (e.g. della's density +/- epsilon);
    # returns None, a message, or a ParamProblem (which lets the error name the YAML path).
    check: Optional[Callable[[dict[str, Any]], Optional[str | ParamProblem]]] = field(default=None, compare=False)
    # A strategy that changes tensor shapes (concat) has its output tensors planned by a layout of its own
    # (plan/planner.py's OWN_LAYOUTS, by name). False: one output tensor per input tensor, of the same shape.
    changes_shapes: bool = False
    details: str = ""                    # longer explanation shown by `merge methods NAME`

    def chunks(self, params: dict[str, Any]) -> Optional[Callable[..., None]]:
        """The chunked body for a tensor with these resolved parameters, or None."""
        if self.chunked is None or (self.chunks_when is not None and not self.chunks_when(params)):
            return None
        return self.chunked

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    def __call__(self, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext,
                 **params: Any) -> torch.Tensor:
        return self.fn(inputs, base, ctx, **params)
