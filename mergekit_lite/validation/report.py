"""What a validation found: one result per check, as text for people and as stable JSON for programs.

The JSON layout is a contract (documented in the README, locked by a test): ``schema`` changes whenever a
field is renamed, removed or changes type; new fields may be added without changing it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA = 1
CHECKS = ("structure", "finite", "recompute", "forward")
MAX_LISTED = 100   # failures kept per check; the total is always counted

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


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
    status: str                 # passed | failed | skipped
    summary: str                # one line: what was checked, or why it was skipped
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status != FAILED

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


def _brief(check: CheckResult) -> str:
    """A check in a few words: its name, its status unless passed, and its headline number."""
    numbers, detail = check.numbers, ""
    if check.status == PASSED and check.name == "recompute":
        exact = "bit-exact" if numbers["bit_exact"] == numbers["tensors"] else f"{numbers['bit_exact']} bit-exact"
        detail = f" ({numbers['tensors']}/{numbers['planned']} tensors {exact})"
    elif check.status == PASSED and check.name == "forward" and numbers.get("merged_loss") is not None:
        losses = [entry["loss"] for entry in numbers["inputs"] if entry["loss"] is not None]
        inputs = f"; inputs {min(losses):.3f}-{max(losses):.3f}" if losses else ""
        detail = f" (loss {numbers['merged_loss']:.3f}{inputs})"
    elif check.status == SKIPPED:
        detail = f" ({check.summary})"
    return check.name + ("" if check.status == PASSED else f" {check.status.upper()}") + detail


@dataclass
class ValidationReport:
    path: str                   # the output folder, absolute
    device: str                 # where the checks ran: "cpu", "cuda:0", ...
    spec: Optional[str]         # where the spec came from (a file), "given" for an in-memory spec, None: no spec
    full: bool                  # --full: every tensor recomputed
    checks: list[CheckResult]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No check failed (skipped checks do not fail a validation; their summary says why they were skipped)."""
        return all(check.passed for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def verdict(self) -> str:
        """One line, for `merge run`."""
        word = "passed" if self.passed else "FAILED"
        return f"Validation {word} on {self.device} in {self.seconds:.1f} s: " + ", ".join(map(_brief, self.checks))

    def __str__(self) -> str:
        word = "PASSED" if self.passed else "FAILED"
        lines = [f"Validation of {self.path} on {self.device}: {word} ({self.seconds:.1f} s)"]
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        for check in self.checks:
            lines.append(f"  {check.name:<{width}}  {check.status:<7}  {check.summary}  ({check.seconds:.2f} s)")
            for finding in check.failures[:10]:
                lines.append(f"      {finding}")
            if len(check.failures) > 10:
                lines.append(f"      ... {len(check.failures) - 10} more (see --json)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "path": self.path, "passed": self.passed, "device": self.device, "spec": self.spec,
                "full": self.full, "seconds": round(self.seconds, 4), "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)
