"""``fold_lora``: LoRA adapters folded into a base, written as a model folder or returned as tensors.

A fold is not a separate engine. Its spec is a merge of one model, the base carrying its adapters, with
``passthrough`` (a copy): the same planning, checks, streaming, sharded output,
config, tokenizer and model card as every merge, and a ``mergekit_config.yml`` that ``merge run`` replays.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from typing import Optional, Sequence, Union

import torch

from ..errors import MergeError, UsageError
from ..spec.references import FLOAT32_MAX

PathLike = Union[str, os.PathLike]


def fold_spec(base: PathLike, adapters: Sequence[PathLike], weights: Optional[Sequence[float]] = None, *,
              tied_embeddings: str = "untie", check_base: bool = True, out_dtype: Optional[str] = None) -> dict:
    """The spec of a fold: one passthrough input, ``{model: base, lora: [{path, weight}, ...]}``; for one
    adapter at weight 1, mergekit's ``base+adapter``."""
    adapters = [os.fspath(a) for a in adapters]
    if not adapters:
        raise UsageError("no adapters to fold", where="ADAPTER", hint="give one or more PEFT adapter folders")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s)", where="--weight",
                         hint="give one weight per adapter, in the same order, or none (all 1)")
    lora = []
    for i, weight in enumerate(weights):   # the spec checks them too, but here the option can be named
        if not math.isfinite(float(weight)) or abs(float(weight)) > FLOAT32_MAX:
            raise UsageError(f"weight {weight!r} of adapter {i + 1} is not a finite float32 number", where="--weight",
                             hint="1 applies the adapter's change as trained, 0.5 half of it")
    for path, weight in zip(adapters, weights):
        entry: dict = {"path": path, "weight": float(weight)}
        if not check_base:
            entry["check_base"] = False
        lora.append(entry)
    model: Union[str, dict] = {"model": os.fspath(base), "lora": lora}
    if tied_embeddings != "untie":
        model["tied_embeddings"] = tied_embeddings
    elif _mergekit_can_say(os.fspath(base), lora):
        model = f"{os.fspath(base)}+{lora[0]['path']}"   # mergekit's spelling: its tools read this spec too
    spec: dict = {"merge_method": "passthrough", "models": [{"model": model}]}
    if out_dtype is not None:
        spec["out_dtype"] = out_dtype
    return spec


def _mergekit_can_say(base: str, lora: list[dict]) -> bool:
    """One adapter at weight 1, its base checked: mergekit's ``base+adapter`` says exactly that (a path holding
    '+' or '@' would be read apart, so it keeps the dict form)."""
    return (len(lora) == 1 and lora[0] == {"path": lora[0]["path"], "weight": 1.0}
            and not any(mark in base + lora[0]["path"] for mark in "+@"))


def fold_lora(base: PathLike, adapters: Union[PathLike, Sequence[PathLike]], out: Optional[PathLike] = None,
              weights: Optional[Sequence[float]] = None, *, tied_embeddings: str = "untie", check_base: bool = True,
              **options):
    """Fold LoRA adapters into ``base`` (local folders or Hub ids ``org/name[@revision]``).

    With ``out``: write the folded model folder (``options`` go to ``run_merge``: ``max_shard_size``,
    ``out_dtype``, ``overwrite``, ``dry_run``, ``device``, ``progress``, ``validate``, ``strict``) and return
    its MergeResult; ``result.validation.status`` is passed or not_checked (its forward check compares the fold
    with the base plus the adapters applied by peft: not checked when that reference cannot run); a failed
    validation raises ValidationFailed, or with ``strict=False`` warns and returns.
    Without: return ``{tensor name: tensor}`` in the base's dtypes, for small models (a notebook's
    load-time weight edit). ``weights`` scale each adapter's change (default 1 each); ``tied_embeddings``
    is ``untie`` (write lm_head separately; default) or ``shared`` (peft's single shared tensor).
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    out_dtype = options.pop("out_dtype", None)
    spec = fold_spec(base, adapters, weights, tied_embeddings=tied_embeddings, check_base=check_base,
                     out_dtype=out_dtype)
    try:
        if out is not None:
            from .merge import run_merge

            return run_merge(spec, out, **options)
        if options:
            raise UsageError(f"options {', '.join(sorted(options))} need an output folder", where="fold_lora",
                             hint="pass out=... to write a model folder")
        return folded_state_dict(spec)
    except MergeError as exc:
        if exc.where and exc.where.startswith("models[0]"):
            # a YAML path of the spec we built means nothing to the caller (file names the input); a tensor does
            exc.where = exc.where.split(": ", 1)[1] if ": " in exc.where else None
        raise


def folded_state_dict(spec: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the spec's one (folded) model, read one at a time; cast to ``out_dtype`` if set."""
    from ..dtypes import parse_dtype
    from ..plan.inputs import open_inputs
    from ..spec.schema import load_spec

    parsed = load_spec(spec)
    cast = parse_dtype(spec["out_dtype"]) if spec.get("out_dtype") else None
    with ExitStack() as opened:   # closed when done
        (checkpoint,) = open_inputs(parsed, opened).values()
        tensors = {}
        for name in checkpoint.tensors:
            tensor = checkpoint.read(name)
            tensors[name] = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
        return tensors
