"""The regular expressions of an adapter_config.json, checked as peft checks them and matched in bounded time.

peft reads ``target_modules`` (a string), ``exclude_modules`` (a string), ``modules_to_save`` entries and the
keys of ``rank_pattern`` / ``alpha_pattern`` as regular expressions and matches them with Python's ``re``, a
backtracking engine: ``(.|.)*q`` against ``model.layers.0.self_attn.q_proj`` tries 2^n ways, so a crafted
config hangs any tool that matches it. Here each pattern is

- checked with ``re`` itself, so that what peft would reject is refused, naming the config key;
- refused if its fixed repeats expand past MAX_EXPANSION (``((a{1000}){1000}){1000}`` compiles, in the
  ``regex`` engine, into a program of 10^9 steps: gigabytes before the first match);
- matched with the ``regex`` package (mrab-regex: the same syntax and results as ``re`` for every pattern
  ``re`` accepts), whose matching stops at a timeout, within a budget of MATCH_BUDGET seconds per pattern
  for the whole fold. A real pattern matches a module name in microseconds (the 100k modules of a large
  MoE adapter in a fraction of a second); one that runs out is an error naming the key and the pattern.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Optional

import regex

from ..errors import ModelError

try:  # Python's own regular-expression parser (what re.compile uses), to measure a pattern before compiling it
    import re._constants as _sre
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

MATCH_BUDGET = 2.0          # seconds of matching per pattern, over all the module names of a fold
MAX_PATTERN_CHARS = 1000    # real patterns are module names or short alternations
MAX_EXPANSION = 10_000      # pattern items once fixed repeat counts are multiplied out
SUFFIX = r"(.*\.)?({})$"    # rank_pattern / alpha_pattern keys match a dotted suffix of the module path (peft >= 0.15)
CONFIG_HINT = "fix it in adapter_config.json"
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


class Pattern:
    """One user pattern, compiled, with what is left of its time budget."""

    def __init__(self, source: Any, what: str, label: Optional[str], template: str = "{}"):
        self.source, self.what, self.label = source, what, label
        if not isinstance(source, str):
            raise ModelError(f"{what} is {_short(source)}, not a string", file=label, hint=CONFIG_HINT)
        full = template.format(source)
        self._check(full)
        try:
            self._compiled = regex.compile(full)
        except RecursionError:
            raise self._error("is nested too deeply", hint="use module names, or a short pattern") from None
        except (regex.error, OverflowError) as exc:   # re accepted it; regex must too
            raise self._error(f"cannot be matched safely ({exc})") from None
        self._left = MATCH_BUDGET
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a LoRA source sent to Ray workers) without its lock."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def match(self, text: str) -> bool:
        """Whether the pattern matches at the start of ``text`` (re.match)."""
        return self._run(self._compiled.match, text)

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches all of ``text`` (re.fullmatch)."""
        return self._run(self._compiled.fullmatch, text)

    def _run(self, method: Any, text: str) -> bool:
        with self._lock:
            start = time.perf_counter()
            try:
                if self._left <= 0:
                    raise TimeoutError
                return method(text, timeout=self._left) is not None
            except TimeoutError:
                raise self._error(f"takes more than {MATCH_BUDGET:g} s to match the module names (it backtracks "
                                  "exponentially)", hint="peft matches it with Python's re, where it could run for "
                                  "hours: use module names, or a pattern without a repeat of a repeat or of "
                                  "overlapping alternatives, such as (a+)+ or (.|.)*") from None
            finally:
                self._left -= time.perf_counter() - start

    def _check(self, full: str) -> None:
        if len(self.source) > MAX_PATTERN_CHARS:
            raise self._error(f"is {len(self.source):,} characters long, more than the {MAX_PATTERN_CHARS:,} read",
                              hint="use module names, or a short pattern")
        try:
            re.compile(full)                # what peft compiles
            parsed = _parser.parse(full)
        except re.error as exc:
            raise self._error(f"is not a valid regular expression ({_own_error(self.source) or exc})",
                              hint=f"peft reads it as a regular expression; {CONFIG_HINT}") from None
        except (RecursionError, OverflowError):
            raise self._error("is nested too deeply", hint="use module names, or a short pattern") from None
        if _expansion(parsed) > MAX_EXPANSION:
            raise self._error(f"repeats fixed counts to more than {MAX_EXPANSION:,} items",
                              hint="use module names, or a pattern without large nested counts such as (a{100}){100}")

    def _error(self, what: str, hint: str = CONFIG_HINT) -> ModelError:
        return ModelError(f"{self.what} {_short(self.source)} {what}", file=self.label, hint=hint)


def _expansion(items: Any) -> int:
    """How many items the pattern holds with each repeat's count multiplied out (its upper bound when finite,
    else its lower bound), stopping early past MAX_EXPANSION; iterative, so any nesting is measured."""
    total = 0
    stack: list[tuple[Any, int]] = [(items, 1)]
    while stack:
        node, factor = stack.pop()
        for op, arg in node:
            if op in _REPEATS:
                low, high, sub = arg
                count = high if high != _sre.MAXREPEAT else low
                stack.append((sub, factor * max(count, 1)))
            elif op is _sre.SUBPATTERN:
                stack.append((arg[-1], factor))
            elif op is _sre.BRANCH:
                stack.extend((branch, factor) for branch in arg[1])
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                stack.append((arg[1], factor))
            elif op is getattr(_sre, "ATOMIC_GROUP", None):
                stack.append((arg, factor))
            elif op is _sre.GROUPREF_EXISTS:
                stack.extend((branch, factor) for branch in arg[1:] if branch is not None)
            total += factor
            if total > MAX_EXPANSION:
                return total
    return total


def _own_error(source: str) -> Optional[re.error]:
    """The error of the pattern alone, whose positions are the user's (None if only its template fails)."""
    try:
        re.compile(source)
    except re.error as exc:
        return exc
    except (RecursionError, OverflowError):
        pass
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
