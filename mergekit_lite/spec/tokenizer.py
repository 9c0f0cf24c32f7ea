"""The spec's tokenizer keys, read strictly: ``tokenizer_source``, the ``tokenizer:`` section, ``chat_template``.

mergekit's forms (config.py and tokenizer/config.py in 0.1.5)::

    tokenizer_source: base | union | <model>
    tokenizer:
      source: union | base | <model>          # default union
      tokens:
        <|im_start|>: {source: <model>, force: true}
        <tok>: {source: {kind: model_token, model: <model>, token: <text> | token_id: <int>}}
        <tok>: {source: {kind: zero}}
      pad_to_multiple_of: 64
    chat_template: auto | alpaca | chatml | llama3 | mistral | exaone | <Jinja text>

Only the structure is checked here; whether a named token exists is checked when the vocabulary is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .references import ModelRef, parse_reference

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
MODEL_TOKEN_KEYS = ("kind", "model", "token", "token_id")
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "llama3", "mistral", "exaone")


@dataclass(frozen=True)
class ModelToken:
    """``{kind: model_token}``: the row of ``token`` (or of id ``token_id``) in ``model``'s own embeddings."""

    model: ModelRef
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class ZeroToken:
    """``{kind: zero}``: a row of zeros."""


TokenSource = Union[ModelRef, ModelToken, ZeroToken, None]


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource
    force: bool
    where: str


@dataclass(frozen=True)
class TokenizerSpec:
    source: Union[str, ModelRef]                   # "union", "base" or a model
    tokens: dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None
    where: str = "tokenizer"                       # the YAML key it came from (tokenizer or tokenizer_source)

    def references(self) -> list[tuple[ModelRef, str]]:
        where = self.where if self.where == "tokenizer_source" else f"{self.where}.source"
        found = [(self.source, where)] if isinstance(self.source, ModelRef) else []
        for token, rule in self.tokens.items():
            model = rule.source.model if isinstance(rule.source, ModelToken) else rule.source
            if isinstance(model, ModelRef):
                found.append((model, f"{rule.where}.source"))
        return found


def parse_tokenizer(data: dict, fail, check_keys) -> Optional[TokenizerSpec]:
    """``tokenizer_source`` or ``tokenizer:`` (not both, as in mergekit) as one TokenizerSpec, else None."""
    legacy, section = data.get("tokenizer_source"), data.get("tokenizer")
    if legacy is not None and section is not None:
        raise fail("tokenizer_source and tokenizer cannot both be given", where="tokenizer",
                   hint="move tokenizer_source's value to tokenizer.source")
    if legacy is not None:
        return TokenizerSpec(_source(legacy, "tokenizer_source", fail), where="tokenizer_source")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise fail("expected a mapping with source, tokens, pad_to_multiple_of", where="tokenizer")
    check_keys(section, TOKENIZER_KEYS, "tokenizer", fail)
    source = _source(section.get("source", "union"), "tokenizer.source", fail)
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise fail("pad_to_multiple_of must be a positive integer", where="tokenizer.pad_to_multiple_of")
    tokens = section.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise fail("tokens must map each token's text to {source, force}", where="tokenizer.tokens")
    rules = {str(token): _rule(rule, f"tokenizer.tokens.{token}", fail, check_keys)
             for token, rule in tokens.items()}
    return TokenizerSpec(source, rules, pad)


def _source(value: Any, where: str, fail) -> Union[str, ModelRef]:
    if value in ("union", "base"):
        return value
    if value is None:
        raise fail("empty tokenizer source", where=where, hint="write base, union, or a model")
    return _reference(value, where, fail)


def _reference(value: Any, where: str, fail) -> ModelRef:
    from ..errors import SpecError
    try:
        return parse_reference(value, where)
    except SpecError as exc:
        raise fail(exc.what, where=exc.where, hint=exc.hint) from None


def _rule(rule: Any, where: str, fail, check_keys) -> TokenRule:
    if rule is None:
        rule = {}
    if not isinstance(rule, dict):
        raise fail("expected a mapping with source and force", where=where)
    check_keys(rule, TOKEN_KEYS, where, fail)
    force = rule.get("force", False)
    if not isinstance(force, bool):
        raise fail("force must be true or false", where=f"{where}.force")
    source = rule.get("source")
    if isinstance(source, dict) and "kind" in source:
        source = _kind(source, f"{where}.source", fail, check_keys)
    elif source is not None:
        source = _reference(source, f"{where}.source", fail)
    if force and source is None:
        raise fail("force: true needs a source", where=where, hint="say where the forced embedding comes from")
    return TokenRule(source, force, where)


def _kind(source: dict, where: str, fail, check_keys) -> Union[ModelToken, ZeroToken]:
    kind = source["kind"]
    if kind == "zero":
        check_keys(source, ("kind",), where, fail)
        return ZeroToken()
    if kind != "model_token":
        raise fail(f"unknown kind {kind!r}", where=f"{where}.kind", hint="kind is model_token or zero")
    check_keys(source, MODEL_TOKEN_KEYS, where, fail)
    if "model" not in source:
        raise fail("model_token needs model", where=where)
    token, token_id = source.get("token"), source.get("token_id")
    if (token is None) == (token_id is None):
        raise fail("model_token needs exactly one of token or token_id", where=where)
    if token_id is not None and (type(token_id) is not int or token_id < 0):
        raise fail("token_id must be a non-negative integer", where=f"{where}.token_id")
    if token is not None and not isinstance(token, str):
        raise fail("token must be the token's text", where=f"{where}.token")
    return ModelToken(_reference(source["model"], f"{where}.model", fail), token, token_id)


def parse_chat_template(value: Any, fail) -> Optional[str]:
    """``auto``, a template name, or Jinja text (mergekit: at least 20 characters and a ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail("chat_template must be a string", where="chat_template")
    if value == "auto" or value in CHAT_TEMPLATE_NAMES:
        return value
    if len(value) < 20 or "{" not in value:
        raise fail(f"unknown chat template {value!r}", where="chat_template",
                   hint="use auto, one of " + ", ".join(CHAT_TEMPLATE_NAMES) + ", or a Jinja template's text")
    return value
