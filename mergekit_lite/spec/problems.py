"""Every problem of a spec, not just the first: what `merge check` shows, one line each.

The schema reader and the planner's checks make their errors with a ``Problems`` (it is the reader's ``fail``:
calling it makes a SpecError for the file) and read each section of the spec inside ``guard()``: a problem
there is recorded and the reader goes on with the next section. At the end ``raise_if_any`` raises one
``SpecProblems``: a SpecError whose message is the first problem's (what `merge run` prints), carrying all of
them (``.problems``) and what could be read of the spec (``.spec``, for the checks that come after the schema).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from ..errors import SpecError, did_you_mean


class SpecProblems(SpecError):
    """The first problem's message; ``problems``: all of them in the order found; ``spec``: what was read."""

    def __init__(self, problems: list[SpecError], spec: Any = None):
        first = problems[0]
        super().__init__(first.what, where=first.where, hint=first.hint, file=first.file)
        self.problems = tuple(problems)
        self.spec = spec

    def message(self) -> str:
        more = len(getattr(self, "problems", ())) - 1
        return super().message() + (f"\n({more} more problem{'s' if more > 1 else ''} found; `merge check "
                                    f"{self.file or 'SPEC'}` lists every one)" if more > 0 else "")


class Problems:
    """The problems of one spec file, collected as they are found."""

    def __init__(self, file: Optional[str] = None):
        self.file = file
        self.found: list[SpecError] = []

    def __call__(self, what: str, where: Optional[str] = None, hint: Optional[str] = None) -> SpecError:
        return SpecError(what, where=where, hint=hint, file=self.file)

    def report(self, error: SpecError) -> None:
        error.file = error.file or self.file
        self.found.append(error)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Record a SpecError raised inside (all of a SpecProblems) and go on after the block."""
        try:
            yield
        except SpecProblems as exc:
            for error in exc.problems:
                self.report(error)
        except SpecError as exc:
            self.report(exc)

    def raise_if_any(self, spec: Any = None) -> None:
        if self.found:
            raise SpecProblems(self.found, spec)


def misspelled(node: dict, key: str, allowed: tuple[str, ...]) -> bool:
    """An unknown key of ``node`` (one not ``allowed``) is ``key`` misspelled: reported as an unknown key, so not
    also as a missing one."""
    return key not in node and any(k not in allowed and did_you_mean(str(k), (key,)) for k in node)


def guard(problems: Optional[Problems]):
    """``problems.guard()``, or no guard at all (the first problem raises) without a collector."""
    from contextlib import nullcontext

    return problems.guard() if problems is not None else nullcontext()
