"""What a validation found: one result per check, as text for people and as stable JSON for programs.

Each check ends in one of four statuses: passed; failed (its findings are listed); not checked (it applies
but could not be carried out, or ran on nothing: the summary says why); not applicable (it does not apply to
this input, e.g. recompute without a merge record, or a check the caller turned off). The verdict is FAILED
when a check failed, else NOT CHECKED when a check was not checked, else PASSED: a check that did not run
never counts as passed.

The JSON layout is a contract (documented in docs/validation.md, locked by a test): ``schema`` changes
whenever a field is renamed, removed or changes type or meaning; new fields may be added without changing it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA = 2          # 2: statuses not_checked / not_applicable replace skipped; `passed` only for a PASSED verdict
CHECKS = ("structure", "finite", "recompute", "forward")
MAX_LISTED = 100   # failures kept per check; the total is always counted

PASSED, FAILED, NOT_CHECKED, NOT_APPLICABLE = "passed", "failed", "not_checked", "not_applicable"
LABELS = {PASSED: "passed", FAILED: "failed", NOT_CHECKED: "NOT CHECKED", NOT_APPLICABLE: "not applicable"}
VERDICT_WORDS = {PASSED: "PASSED", FAILED: "FAILED", NOT_CHECKED: "NOT CHECKED"}
EXIT_CODES = {PASSED: 0, FAILED: 1, NOT_CHECKED: 3}


def number(value: Optional[float]) -> Optional[float]:
    """A float for the JSON report: NaN and infinities (which JSON cannot hold) become null."""
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Finding:
    """One failure, naming the tensor and/or file it concerns."""

    message: str
    tensor: Optional[str] = None
    file: Optional[str] = None      # file name inside the output folder (or a source's path)

    def __str__(self) -> str:
        where = [part for part in (self.file, f"tensor '{self.tensor}'" if self.tensor else None) if part]
        return ": ".join(where + [self.message])

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "file": self.file, "message": self.message}


@dataclass
class CheckResult:
    name: str                   # one of CHECKS
    status: str                 # passed | failed | not_checked | not_applicable
    summary: str                # one line: what was checked, or why it was not checked / does not apply
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __repr__(self) -> str:
        return f"<CheckResult {self.name} {self.status}: {self.summary}>"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary, "seconds": round(self.seconds, 4),
                "numbers": self.numbers, "failures": [f.to_dict() for f in self.failures[:MAX_LISTED]],
                "failures_total": len(self.failures)}


def outcome(name: str, failures: list[Finding], summary: str, numbers: dict[str, Any],
            seconds: float) -> CheckResult:
    """A check's result: failed when anything was found (the findings are listed under it)."""
    if failures:
        count = f"{len(failures)} problem" + ("s" if len(failures) > 1 else "")
        return CheckResult(name, FAILED, count, seconds, numbers, failures)
    return CheckResult(name, PASSED, summary, seconds, numbers)


def not_checked(name: str, reason: str, numbers: dict[str, Any], seconds: float = 0.0) -> CheckResult:
    return CheckResult(name, NOT_CHECKED, reason, seconds, numbers)


def not_applicable(name: str, reason: str, numbers: dict[str, Any]) -> CheckResult:
    return CheckResult(name, NOT_APPLICABLE, reason, 0.0, numbers)


def _brief(check: CheckResult) -> str:
    """A check in a few words: its name, its status unless passed, what it cost (when it ran) and its headline
    number: ``recompute 0.3 s (21/57 tensors bit-exact)``."""
    numbers, detail = check.numbers, ""
    if check.status == PASSED and check.name == "recompute":
        exact = "bit-exact" if numbers["bit_exact"] == numbers["tensors"] else f"{numbers['bit_exact']} bit-exact"
        detail = f" ({numbers['tensors']}/{numbers['planned']} tensors {exact})"
    elif check.status == PASSED and check.name == "forward" and numbers.get("merged_loss") is not None:
        losses = [entry["loss"] for entry in numbers["inputs"] if entry["loss"] is not None]
        inputs = f"; inputs {min(losses):.3f}-{max(losses):.3f}" if losses else ""
        detail = f" (loss {numbers['merged_loss']:.3f}{inputs})"
    elif check.status == NOT_CHECKED:
        detail = f" ({check.summary})"
    elif check.status == NOT_APPLICABLE:
        detail = f" ({check.summary.split(' (')[0].split(':')[0]})"
    word = {PASSED: "", FAILED: " FAILED"}.get(check.status, f" {LABELS[check.status]}")
    cost = f" {check.seconds:.1f} s" if check.status in (PASSED, FAILED) or check.seconds >= 0.05 else ""
    return check.name + word + cost + detail


@dataclass
class ValidationReport:
    path: str                   # the output folder, absolute
    device: str                 # where the checks ran: "cpu", "cuda:0", ...
    spec: Optional[str]         # where the spec came from (a file), "given" for an in-memory spec, None: no spec
    full: bool                  # --full: every tensor recomputed
    checks: list[CheckResult]
    seconds: float = 0.0
    sources_from: Optional[dict[str, str]] = None   # {folder, reason}: where relative source paths were resolved

    @property
    def status(self) -> str:
        """The verdict: "failed" if any check failed, else "not_checked" if any check that applies could not be
        carried out, else "passed". Checks that do not apply (not_applicable) do not count either way."""
        found = {check.status for check in self.checks}
        return FAILED if FAILED in found else NOT_CHECKED if NOT_CHECKED in found else PASSED

    @property
    def passed(self) -> bool:
        """Every check that applies passed (False when one failed or could not be carried out)."""
        return self.status == PASSED

    @property
    def failed(self) -> bool:
        """A check failed: the output is wrong (not merely unproven)."""
        return self.status == FAILED

    @property
    def exit_code(self) -> int:
        """`merge validate`'s exit code: 0 passed, 1 failed, 3 not checked."""
        return EXIT_CODES[self.status]

    @property
    def unchecked(self) -> list[CheckResult]:
        return [check for check in self.checks if check.status == NOT_CHECKED]

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def verdict(self) -> str:
        """One line, for `merge run`: the verdict, the total time, and each check with what it cost."""
        word = {PASSED: "passed"}.get(self.status, VERDICT_WORDS[self.status])
        return f"Validation {word} on {self.device} in {self.seconds:.1f} s: " + ", ".join(map(_brief, self.checks))

    def __str__(self) -> str:
        lines = [f"Validation of {self.path} on {self.device}: {VERDICT_WORDS[self.status]} ({self.seconds:.1f} s)"]
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        column = max([7] + [len(LABELS[c.status]) for c in self.checks])
        for check in self.checks:
            lines.append(f"  {check.name:<{width}}  {LABELS[check.status]:<{column}}  {check.summary}  "
                         f"({check.seconds:.2f} s)")
            for finding in check.failures[:10]:
                lines.append(f"      {finding}")
            if len(check.failures) > 10:
                lines.append(f"      ... {len(check.failures) - 10} more (see --json)")
        if self.sources_from is not None:
            lines.append(f"Relative source paths resolved from {self.sources_from['folder']} "
                         f"({self.sources_from['reason']})")
        if self.status == NOT_CHECKED:
            names = ", ".join(check.name for check in self.unchecked)
            lines.append(f"Nothing failed, but not everything could be checked ({names}): see the reasons above. "
                         "Exit code 3.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        checks = ", ".join(f"{c.name}={c.status}" for c in self.checks)
        return f"<ValidationReport {self.status.upper()} {self.path!r} on {self.device}: {checks}>"

    def _repr_html_(self) -> str:
        """Jupyter: the verdict, then one row per check (its findings under it, the first ten)."""
        from html import escape

        rows = []
        for check in self.checks:
            found = "".join(f"<br><code>{escape(str(f))}</code>" for f in check.failures[:10])
            more = f"<br>... {len(check.failures) - 10} more" if len(check.failures) > 10 else ""
            rows.append(f"<tr><td>{escape(check.name)}</td><td><b>{escape(LABELS[check.status])}</b></td>"
                        f"<td style='text-align:left'>{escape(check.summary)}{found}{more}</td>"
                        f"<td>{check.seconds:.2f} s</td></tr>")
        return (f"<p>Validation of <code>{escape(self.path)}</code> on {escape(self.device)}: "
                f"<b>{VERDICT_WORDS[self.status]}</b> ({self.seconds:.1f} s)</p><table>"
                "<tr><th>check</th><th>status</th><th>summary</th><th>time</th></tr>" + "".join(rows) + "</table>")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "path": self.path, "passed": self.passed, "verdict": self.status,
                "exit_code": self.exit_code, "device": self.device, "spec": self.spec,
                "sources_from": self.sources_from, "full": self.full, "seconds": round(self.seconds, 4),
                "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)
