"""Token embeddings and lm_head rows in the output vocabulary's order: a source transform.

With a tokenizer merge, every model's vocabulary-indexed tensor (the input embeddings and ``lm_head``) is read
through a ``RemappedSource``: output row r is the model's own row of the same token, or, for a token the model
lacks (or a ``force``d one), a default shared by all models. So strategies get same-shape inputs whose rows
mean the same token, and nothing else in the engine changes.

The defaults are mergekit's (0.1.5, tokenizer/embed.py): a ``tokens:`` entry's source (a model's row of the
token, ``model_token`` by text or id, or zeros); else the only model that has the token; else the base
model's row when it has one; else the average of the models that have it (summed in model order in the
tensors' dtype, then divided); zeros for a token no model has. Rows are read in blocks: a block of output
rows reads the runs of consecutive input rows it needs, and each default row is read (and cached) once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import SpecError
from ..safetensors_format import TensorInfo
from ..spec.references import ModelRef
from ..spec.tokenizer import ModelToken, ZeroToken
from .jobs import Source
from .vocabulary import VOCAB_TENSORS, Vocabulary

# How a default row is made: zeros, one model's row, or the average of several models' rows.
Rule = Union[None, tuple[ModelRef, int], list[tuple[ModelRef, int]]]


def default_rules(vocab: Vocabulary, models: Sequence[ModelRef], base: Optional[ModelRef]
                  ) -> tuple[dict[int, Rule], set[int]]:
    """Per output id that needs one, where its default row comes from; and the forced ids."""
    rules: dict[int, Rule] = {}
    forced = set()
    maps = {ref: vocab.maps[ref].tolist() for ref in models}   # Python ints: 128k tokens x models lookups
    for token, tid in vocab.tokens.items():
        rule = vocab.spec.tokens.get(token)
        force = rule is not None and rule.force
        present = [ref for ref in models if maps[ref][tid] >= 0]
        if force:
            forced.add(tid)
        if not force and len(present) == len(models):
            continue
        if rule is not None and rule.source is not None:
            rules[tid] = _configured(vocab, models, token, tid, rule.source, rule.where)
        elif len(present) == 1:
            rules[tid] = (present[0], maps[present[0]][tid])
        elif not present:
            rules[tid] = None
        elif base is not None and base in present:
            rules[tid] = (base, maps[base][tid])
        else:
            rules[tid] = [(ref, maps[ref][tid]) for ref in present]
    return rules, forced


def _configured(vocab: Vocabulary, models: Sequence[ModelRef], token: str, tid: int, source, where: str) -> Rule:
    if isinstance(source, ZeroToken):
        return None
    model = source.model if isinstance(source, ModelToken) else source
    if model not in models:
        raise SpecError(f"token {token!r} takes its embedding from {model}, which is not one of the merged models",
                        where=f"{where}.source", hint="name a model listed under models: or base_model")
    if isinstance(source, ModelToken):
        row = source.token_id
        if row is None:
            row = vocab.originals.get(model, vocab.originals[next(iter(vocab.originals))]).get(source.token)
            if row is None:
                raise SpecError(f"token {source.token!r} is not in {model}'s vocabulary", where=f"{where}.source.token",
                                hint="give a token of that model's tokenizer, or its id with token_id")
        return (model, row)
    row = int(vocab.maps[model][tid])
    if row < 0:
        raise SpecError(f"token {token!r} is not in {model}'s vocabulary", where=f"{where}.source",
                        hint="take it from a model that has it, or use {kind: model_token, model: ..., token: ...}")
    return (model, row)


class Defaults:
    """The default rows of one output tensor, shared by its models' sources; each computed once."""

    def __init__(self, rules: dict[int, Rule], sources: dict[ModelRef, Source], dtype: torch.dtype,
                 rest: tuple[int, ...]) -> None:
        self.rules, self.sources, self.dtype, self.rest = rules, sources, dtype, rest
        self._rows: dict[int, torch.Tensor] = {}
        self.padding: dict[RemappedSource, torch.Tensor] = {}    # per model: its padding row
        self._lock, self.lock = threading.Lock(), threading.RLock()

    def row(self, tid: int) -> torch.Tensor:
        with self._lock:
            if tid not in self._rows:
                self._rows[tid] = self._make(self.rules.get(tid, None))
            return self._rows[tid]

    def _read(self, ref: ModelRef, row: int) -> torch.Tensor:
        source = self.sources[ref]   # row checked by remap_sources
        return source.checkpoint.read(source.name, (row, row + 1))[0].to(self.dtype)

    def _make(self, rule: Rule) -> torch.Tensor:
        if rule is None:
            return torch.zeros(self.rest, dtype=self.dtype)
        if isinstance(rule, tuple):
            return self._read(*rule)
        embed = torch.zeros(self.rest, dtype=self.dtype)
        for ref, row in rule:
            embed = embed + self._read(ref, row)
        embed /= len(rule)
        return embed


@dataclass(frozen=True, eq=False)
class RemappedSource(Source):
    """One model's vocabulary-indexed tensor in the output vocabulary's order (rows, -1: a default)."""

    rows: torch.Tensor = None          # type: ignore[assignment]
    defaults: Defaults = None          # type: ignore[assignment]
    padding: int = 0                   # the last rows are pad_to_multiple_of's padding

    @property
    def info(self) -> TensorInfo:
        stored = self.checkpoint.tensors[self.name]
        return dataclasses.replace(stored, shape=(len(self.rows), *self.defaults.rest), dtype=self.defaults.dtype)

    @property
    def digest(self) -> str:
        """What decides this source's rows (for the resume journal's fingerprint): the map, defaults, padding."""
        rules = sorted((tid, repr(rule)) for tid, rule in self.defaults.rules.items())
        text = repr((self.rows.tolist(), rules, self.padding, str(self.defaults.dtype)))
        return hashlib.sha256(text.encode()).hexdigest()

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        start, end = rows or (0, len(self.rows))
        own = self.rows[start:end]
        out = torch.zeros((end - start, *self.defaults.rest), dtype=self.defaults.dtype)
        at = torch.nonzero(own >= 0).flatten()
        if at.numel():
            src = own[at]
            breaks = torch.nonzero(((at[1:] - at[:-1]) != 1) | ((src[1:] - src[:-1]) != 1)).flatten() + 1
            bounds = [0, *breaks.tolist(), at.numel()]
            for first, last in zip(bounds[:-1], bounds[1:]):
                i, o = int(src[first]), int(at[first])
                out[o:o + last - first] = self.checkpoint.read(self.name, (i, i + last - first))
        tokens = len(self.rows) - self.padding
        for o in torch.nonzero(own < 0).flatten().tolist():
            out[o] = self.defaults.row(start + o) if start + o < tokens else self.padding_row()
        return out

    def padding_row(self) -> torch.Tensor:
        """pad_to_multiple_of's rows: the mean of this model's token rows (John Hewitt's heuristic, as mergekit),
        computed once, with torch.mean over the rows in the tensor's dtype as mergekit does (so this reads one
        copy of this model's rows, in that dtype, when padding is asked for)."""
        with self.defaults.lock:
            if self not in self.defaults.padding:
                tokens = self.read((0, len(self.rows) - self.padding))
                self.defaults.padding[self] = torch.mean(tokens, dim=0)
                del tokens
            return self.defaults.padding[self]


def remap_sources(vocab: Vocabulary, rules: dict[int, Rule], forced: set[int], sources: dict[ModelRef, Source],
                  load_dtype: Optional[torch.dtype]) -> dict[ModelRef, Source]:
    """Each model's source of one vocabulary tensor, read in the output order (unchanged when it already is)."""
    first = next(iter(sources.values())).info
    dtype = load_dtype
    if dtype is None:
        dtype = first.dtype
        for source in sources.values():
            dtype = torch.promote_types(dtype, source.info.dtype)
    for tid, rule in rules.items():   # a model_token id past a model's rows: refused before any merging
        for ref, row in [rule] if isinstance(rule, tuple) else rule or []:
            if ref in sources and not 0 <= row < sources[ref].info.shape[0]:
                raise SpecError(f"token id {row} is out of range for {ref}: its '{sources[ref].name}' has "
                                f"{sources[ref].info.shape[0]} rows", where="tokenizer.tokens",
                                hint="give an id below that model's vocabulary size, or the token's text")
    defaults = Defaults(rules, sources, dtype, tuple(first.shape[1:]))
    identity = torch.arange(vocab.size)
    out = {}
    for ref, source in sources.items():
        ids = torch.full((vocab.size,), -1, dtype=torch.long)
        ids[: len(vocab.tokens)] = vocab.maps[ref]
        for tid in forced:
            ids[tid] = -1
        if (source.info.shape[0] == vocab.size and torch.equal(ids, identity)
                and (load_dtype is not None or source.info.dtype == dtype)):
            out[ref] = source
        else:
            out[ref] = RemappedSource(source.checkpoint, source.name, ids, defaults, vocab.size - len(vocab.tokens))
    return out


class TokenRemap:
    """A tokenizer merge's remapping of the vocabulary tensors of every job (whole_models.py, stacking.py).

    The defaults depend on which models supply the tensor (a slices merge takes its embeddings from the first
    slice's models and lm_head from the last's, as mergekit), so they are worked out per set of models."""

    def __init__(self, vocab: Vocabulary, models: Sequence[ModelRef], base: Optional[ModelRef]) -> None:
        self.vocab = vocab
        self._rules: dict[tuple, tuple[dict[int, Rule], set[int]]] = {}
        rules, _ = self.rules(models, base)
        unset = [token for token, tid in vocab.tokens.items() if tid in rules and rules[tid] is None
                 and not isinstance(getattr(vocab.spec.tokens.get(token), "source", None), ZeroToken)]
        if unset:
            vocab.notes.append(f"{len(unset)} token(s) of the output tokenizer are in none of the merged models "
                               f"(e.g. {unset[0]!r}); their embedding rows are zeros, as in mergekit. Name a source "
                               "for them under tokenizer.tokens to choose another.")

    def rules(self, models: Sequence[ModelRef], base: Optional[ModelRef]) -> tuple[dict[int, Rule], set[int]]:
        key = (tuple(models), base)
        if key not in self._rules:
            self._rules[key] = default_rules(self.vocab, models, base)
        return self._rules[key]

    def wrap(self, name: str, sources: dict[ModelRef, Source], load_dtype: Optional[torch.dtype],
             base: Optional[ModelRef]) -> dict[ModelRef, Source]:
        """The sources of output tensor ``name`` (by model, in model order), remapped when it is a vocabulary one."""
        if name not in VOCAB_TENSORS:
            return sources
        rules, forced = self.rules(list(sources), base)
        return remap_sources(self.vocab, rules, forced, sources, load_dtype)

    def by_input(self, name: str, sources: dict[int, Source], refs: dict[int, ModelRef],
                 load_dtype: Optional[torch.dtype], base: Optional[ModelRef]) -> dict[int, Source]:
        """``wrap`` for a layout's sources keyed by input (``refs``: each key's model; keys in model order)."""
        by_ref = {ref: sources[key] for key, ref in reversed(refs.items())}
        remapped = self.wrap(name, {ref: by_ref[ref] for ref in dict.fromkeys(refs.values())}, load_dtype, base)
        return {key: remapped[ref] for key, ref in refs.items()}
