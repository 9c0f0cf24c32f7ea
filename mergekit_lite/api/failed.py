"""The error a library call raises when the output it wrote failed its validation."""

from __future__ import annotations

from typing import Any, Optional

from ..errors import MergeError


class ValidationFailed(MergeError):
    """``run_merge`` (or ``extract_lora``, ``merge_adapters``) wrote its output, but the validation found it wrong
    (the output stays for inspection). ``report`` is the ValidationReport, ``result`` the command's result (with
    it). Exit code 1."""

    def __init__(self, result: Any, pushed_to: Optional[str] = None, where: str = "run_merge"):
        self.result, self.report = result, result.validation
        failed = ", ".join(c.name for c in self.report.checks if c.status == "failed")
        not_pushed = f"; not pushed to {pushed_to}" if pushed_to else ""
        super().__init__(f"validation failed ({failed}); the output was written and stays in {result.path} for "
                         f"inspection{not_pushed}", where=where,
                         hint="see the report (error.report, or `merge validate OUT`); strict=False returns the "
                              "result with a warning instead")
