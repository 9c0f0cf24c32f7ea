"""Errors a user can act on.

Every error names *where* the problem is (a YAML path such as ``models[1].parameters.density``, a tensor
name, or a file), *what* is wrong, and a *hint* that says how to fix it. The exit code lives on the class,
so the CLI never has to guess: 2 for problems with the spec or the command line, 1 for everything else.
Library code raises these; only the CLI prints them.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional


class MergeError(Exception):
    """Base class: a problem the user can fix. A traceback is never shown for these (unless --debug)."""

    exit_code = 1

    def __init__(self, what: str, *, where: Optional[str] = None, hint: Optional[str] = None,
                 file: Optional[str] = None):
        self.what = what
        self.where = where
        self.hint = hint
        self.file = file
        super().__init__(self.message())

    def message(self) -> str:
        head = ": ".join(part for part in (self.file, self.where, self.what) if part)
        return head + (f"\nHint: {self.hint}" if self.hint else "")

    def __str__(self) -> str:
        return self.message()


class SpecError(MergeError):
    """The merge spec (or a command-line option) asks for something invalid."""

    exit_code = 2


class UsageError(SpecError):
    """The command line or the output path cannot be used as given."""


class ModelError(MergeError):
    """An input model cannot be read, or does not fit the others."""


class StrategyError(MergeError):
    """A strategy failed while computing a tensor."""


class OutputError(MergeError):
    """The output could not be written (disk full, permissions, ...)."""


class HubError(MergeError):
    """The Hugging Face Hub refused or failed a request."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), saying what it left behind. The CLI prints it on one line and exits with 130."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return self.what


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


@contextmanager
def within(file: Optional[str], where: Optional[str] = None,
           kinds: tuple[type[MergeError], ...] = (MergeError,)) -> Iterator[None]:
    """Errors of ``kinds`` raised inside are about ``file`` (when they name no file of their own) and, with
    ``where``, about that YAML path first (then their own ``where``, e.g. a tensor). Code that reads one entry
    of a spec (a parameter's value, an input's folder) knows neither the spec's file nor the entry's path; the
    code that walks the spec says them once here."""
    try:
        yield
    except kinds as exc:
        exc.file = exc.file or file
        if where is not None:
            inside = exc.where is not None and (exc.where == where or exc.where.startswith((where + ".", where + "[")))
            exc.where = where if exc.where is None else exc.where if inside else f"{where}: {exc.where}"
        raise
