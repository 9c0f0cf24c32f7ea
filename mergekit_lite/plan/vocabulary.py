"""The output vocabulary of a tokenizer merge (``tokenizer_source``, ``tokenizer:``) and each input's map to it.

mergekit's rules (0.1.5, tokenizer/build.py), kept so that the output equals its output:

- the base tokenizer is the base model's (else the first model's), stripped of tokens whose id is not below
  its config's ``vocab_size`` (fast BPE tokenizers only, as mergekit);
- ``base``: that tokenizer; ``<model>``: that model's tokenizer as it is; ``union``: the base tokenizer plus,
  in model order, every other token below a model's ``vocab_size`` (plain vocabulary first, then added tokens
  with their settings, the first definition winning);
- every token named under ``tokens:`` that the result lacks is added;
- each model's map sends an output id to the row of the same token text in that model, or -1.

transformers is used, and imported here only when a tokenizer is configured: its tokenizer classes decide
``get_vocab()``, how added and special tokens are kept, and the files ``save_pretrained`` writes, which is
what the output has to equal (the ``tokenizers`` package alone knows neither tokenizer_config.json nor
special_tokens_map.json). ``import mergekit_lite`` and merges without a tokenizer section never import it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..architecture import INPUT_EMBEDDINGS, OUTPUT_EMBEDDING, TEXT_SECTION, get_config_value
from ..errors import ModelError, SpecError, within
from ..sources.checkpoint import Checkpoint, contained_path
from ..sources.user_files import COPY_LIMIT, check_copyable, read_json_object
from ..spec.references import ModelRef
from ..spec.schema import Spec
from ..spec.tokenizer import TokenizerSpec

log = logging.getLogger("mergekit_lite")
# The files transformers may read to load a tokenizer: each must be a regular, bounded file inside the model
# folder before it is asked to (a FIFO would hang the load, a link could read any file).
TOKENIZER_INPUTS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                    "chat_template.jinja", "chat_template.json", "config.json")
# The vocabulary-indexed tensors: their rows follow the output tokenizer (remap.py)
VOCAB_TENSORS = frozenset((*INPUT_EMBEDDINGS, OUTPUT_EMBEDDING))


@dataclass
class Vocabulary:
    tokenizer: Any                          # the output tokenizer (transformers), saved with the output
    tokens: dict[str, int]                  # the output vocabulary
    size: int                               # output rows: the vocabulary, padded to pad_to_multiple_of
    maps: dict[ModelRef, torch.Tensor]      # per model: output id -> its own row, -1 when it lacks the token
    originals: dict[ModelRef, dict[str, int]]   # each model's own vocabulary (the base's stripped)
    copy_from: Optional[str]                # the folder whose tokenizer files are the output's, unchanged
    spec: TokenizerSpec
    notes: list[str] = field(default_factory=list)   # facts for the warnings and the model card


def build_vocabulary(spec: TokenizerSpec, checkpoints: dict[ModelRef, Checkpoint], models: Sequence[ModelRef],
                     lead: ModelRef) -> Vocabulary:
    """The output tokenizer and every model's map to it (``models``: every merged model; ``lead``: the base,
    else the first model). Reads tokenizer files and configs only."""
    auto = _transformers().AutoTokenizer
    base_tok, stripped = _stripped(checkpoints[lead], auto)
    tokenizers = {lead: base_tok}
    for ref in models:
        if ref != lead:
            loaded = _load(checkpoints[ref], auto, required=False)
            if loaded is not None:
                tokenizers[ref] = loaded
    copy_from = None
    if isinstance(spec.source, ModelRef):
        out = _load(checkpoints[spec.source], auto, required=True)
        copy_from = checkpoints[spec.source].folder
    elif spec.source == "base":
        out, copy_from = base_tok, None if stripped else checkpoints[lead].folder
    else:
        out = _union(base_tok, tokenizers, checkpoints, auto)
    existing = set(out.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            if out is base_tok:
                out = _copy(base_tok, auto)
            out.add_tokens(token)
            existing.add(token)
            copy_from = None
    vocab = out.get_vocab()
    maps = {}
    for ref in dict.fromkeys([lead, *models]):
        own = tokenizers.get(ref, base_tok).get_vocab()
        rows = vocab_size(checkpoints[ref]) or len(own)
        ids = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new in vocab.items():
            old = own.get(token)
            if old is not None and old < rows and new < len(vocab):
                ids[new] = old
        maps[ref] = ids
    size = len(vocab)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    return Vocabulary(out, vocab, size, maps, {ref: tok.get_vocab() for ref, tok in tokenizers.items()},
                      copy_from, spec)


def unchanged_vocabulary(spec: TokenizerSpec, checkpoints: dict[ModelRef, Checkpoint], models: Sequence[ModelRef],
                         lead: ModelRef, load_dtype: Optional[torch.dtype]) -> bool:
    """True when ``source: base`` or a model's tokenizer needs nothing built: no ``tokens:``, no padding, and every
    merged model (and the source) has the same vocabulary, ids 0..n-1, n = each vocabulary tensor's rows (and
    config vocab_size), so no row moves and nothing is stripped. Its tokenizer files are then copied as they are,
    without transformers (as before tokenizer merging). Read from tokenizer.json alone; anything it cannot settle
    (no tokenizer.json, a special token outside it, vocabularies that differ) says False: transformers decides.
    Without a ``dtype:`` the vocabulary tensors must share one dtype too (remap.py would convert them)."""
    if spec.source == "union" or spec.tokens or spec.pad_to_multiple_of:
        return False
    source = spec.source if isinstance(spec.source, ModelRef) else lead
    wanted = _plain_vocabulary(checkpoints[source])
    if wanted is None:
        return False
    dtypes = set()
    for ref in dict.fromkeys([source, lead, *models]):
        checkpoint = checkpoints[ref]
        if ref != source and _plain_vocabulary(checkpoint) != wanted:
            return False
        tensors = [info for name, info in checkpoint.tensors.items() if name in VOCAB_TENSORS]
        if any(info.shape[0] != len(wanted) for info in tensors) or vocab_size(checkpoint) not in (None, len(wanted)):
            return False
        if ref in models:
            dtypes |= {info.dtype for info in tensors}
    return load_dtype is not None or len(dtypes) <= 1


def _plain_vocabulary(checkpoint: Checkpoint) -> Optional[dict[str, int]]:
    """token -> id from the folder's tokenizer.json (its model's vocabulary and added tokens), when that is the
    whole story: ids 0..n-1 once each, and tokenizer_config.json's added and special tokens all in it. Else None."""
    folder, label = checkpoint.folder, checkpoint.label
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    hint = "download the model's tokenizer files again"
    data = read_json_object(contained_path(folder, "tokenizer.json", label), "tokenizer.json", label, hint,
                            limit=COPY_LIMIT)
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):                      # Unigram: [piece, score] in id order
        vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    if not isinstance(vocab, dict):
        return None
    tokens = dict(vocab)
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or tokens.setdefault(entry.get("content"), entry.get("id")) != entry.get("id"):
            return None
    if set(tokens.values()) != set(range(len(tokens))):
        return None
    settings = {name: read_json_object(contained_path(folder, name, label), name, label, hint, limit=COPY_LIMIT)
                for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
                if os.path.isfile(os.path.join(folder, name))}
    config = settings.get("tokenizer_config.json", {})
    for tid, info in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(info, dict) or str(tokens.get(info.get("content"))) != str(tid):
            return None
    if any(tokens.get(token) != tid for token, tid in settings.get("added_tokens.json", {}).items()):
        return None
    for key, value in [*config.items(), *settings.get("special_tokens_map.json", {}).items()]:
        if key.endswith("_token") or key.endswith("_special_tokens"):   # transformers adds missing special tokens
            for token in value if isinstance(value, list) else [value]:
                text = token.get("content") if isinstance(token, dict) else token
                if isinstance(text, str) and text not in tokens:
                    return None
    return tokens


def vocab_size(checkpoint: Checkpoint) -> Optional[int]:
    for key in ("vocab_size", TEXT_SECTION + "vocab_size"):
        value = get_config_value(checkpoint.config, key)
        if isinstance(value, int):
            return value
    return None


def _transformers():
    try:
        import transformers  # heavy: only when a tokenizer merge or a chat template is asked for
    except ImportError:
        raise SpecError("tokenizer merges and chat_template need the transformers package, which is not installed",
                        hint="pip install 'mergekit-lite[tokenizer]' (or remove tokenizer_source, tokenizer and "
                             "chat_template: the base model's tokenizer files are then copied)") from None
    return transformers


def require_transformers(spec: Spec) -> None:
    """Fail before the merge when the spec asks for a tokenizer merge or a chat template without transformers.
    ``source: base`` or a model alone may need nothing built (``unchanged_vocabulary``): decided when planning."""
    tokenizer = spec.tokenizer
    if spec.chat_template is not None or (tokenizer is not None and (
            tokenizer.source == "union" or tokenizer.tokens or tokenizer.pad_to_multiple_of)):
        with within(spec.file):
            _transformers()


def load_tokenizer(folder: str, label: str, required: bool = True):
    """A model folder's tokenizer as transformers loads it (None when it cannot be and ``required`` is false)."""
    return _load_folder(folder, label, _transformers().AutoTokenizer, required)


def _load(checkpoint: Checkpoint, auto, required: bool):
    return _load_folder(checkpoint.folder, checkpoint.label, auto, required)


def _load_folder(folder: str, label: str, auto, required: bool):
    for filename in TOKENIZER_INPUTS:
        if os.path.lexists(os.path.join(folder, filename)):
            check_copyable(contained_path(folder, filename, label), label)
    try:
        return auto.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    except Exception as exc:   # noqa: BLE001 - transformers raises many kinds; mergekit assumes the base's
        if required:
            raise ModelError(f"its tokenizer cannot be loaded: {exc}", file=label,
                             hint="the folder needs tokenizer.json (or a tokenizer transformers can load)") from None
        log.warning("%s: its tokenizer cannot be loaded (%s); assuming it is the base model's, as mergekit does",
                    label, exc)
        return None


def _stripped(checkpoint: Checkpoint, auto) -> tuple[Any, bool]:
    """The model's tokenizer without tokens whose id is not below its config's vocab_size (and whether any
    were dropped): padded tokenizers name ids the model has no embedding for."""
    tokenizer = _load(checkpoint, auto, required=True)
    rows = vocab_size(checkpoint) or len(tokenizer.get_vocab())
    unused = {token for token, idx in tokenizer.get_vocab().items() if idx >= rows}
    if not unused:
        return tokenizer, False
    path = os.path.join(checkpoint.folder, "tokenizer.json")
    data = read_json_object(contained_path(checkpoint.folder, "tokenizer.json", checkpoint.label), "tokenizer.json",
                            checkpoint.label, "download the model's tokenizer.json again", limit=COPY_LIMIT) \
        if tokenizer.is_fast and os.path.isfile(path) else {"model": {"type": "no tokenizer.json"}}
    if data["model"].get("type") != "BPE":
        raise ModelError(f"its tokenizer has {len(unused)} tokens with ids >= vocab_size {rows}, and only fast BPE "
                         "tokenizers can be stripped of them (as in mergekit)", file=checkpoint.label,
                         hint="use a model with a fast BPE tokenizer (tokenizer.json) as the base")
    import tokenizers

    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < rows]
    for token in unused:
        data["model"]["vocab"].pop(token, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not any(part in unused for part in (m.split(" ") if isinstance(m, str) else m))]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer, True


def _copy(tokenizer, auto):
    """A separate tokenizer equal to ``tokenizer`` (saved and loaded again, as mergekit does)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder, legacy_format=False)
        return auto.from_pretrained(folder, use_fast=True, trust_remote_code=False)


def _union(base_tok, tokenizers: dict[ModelRef, Any], checkpoints: dict[ModelRef, Checkpoint], auto):
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tokenizer in tokenizers.items():
        rows = vocab_size(checkpoints[ref]) or tokenizer.vocab_size
        decoder = tokenizer.added_tokens_decoder
        specials = {info.content for info in decoder.values()}
        for token, idx in tokenizer.get_vocab().items():
            if idx < rows and token not in specials:
                plain.setdefault(token)
        for idx, info in decoder.items():
            if idx < rows and info.content not in added:
                added[info.content] = info
            elif idx < rows and added[info.content] != info:
                log.warning("token %r is added with different settings by several models; the first is kept",
                            info.content)
    out = _copy(base_tok, auto)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def set_vocab_size(config: dict[str, Any], size: int) -> None:
    """config.json's vocab_size (a multimodal config's text_config one when only that has it) to ``size``."""
    text = config.get(TEXT_SECTION.rstrip("."))
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = size
    else:
        config["vocab_size"] = size
