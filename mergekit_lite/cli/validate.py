"""``merge validate OUT``: check that a merged model is what its spec asked for."""

from __future__ import annotations

import sys

import click

from .common import common_options, verbosity


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--spec", default=None, type=click.Path(dir_okay=False),
              help="The spec to recompute from (default: OUT/mergekit_config.yml).")
@click.option("--device", default="auto", show_default=True, metavar="[auto|cpu|cuda|cuda:N|mps]",
              help="Where to run the checks; auto: cuda when present, else cpu.")
@click.option("--full", is_flag=True, help="Recompute every tensor, not a sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the layout is in the README).")
@click.option("--allow-pickle", is_flag=True,
              help="Read sources that have only pickle weights, with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="NaN and Inf in the weights are reported but do not fail.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let the forward check run the model's own code (the *.py files config.json's auto_map names, "
                   "in OUT). Read that code first: running the model runs it.")
@common_options
def validate(out: str, spec: str | None, device: str, full: bool, as_json: bool, allow_pickle: bool,
             allow_nonfinite: bool, trust_remote_code: bool, quiet: bool) -> None:
    """Check the merged model in OUT: structure, NaN/Inf, recomputed tensors, a forward pass.

    Exit code 0 when every check that applies passed, 1 when one failed, 3 when nothing failed but a check
    that applies could not be carried out (NOT CHECKED: missing sources, no transformers, ...; the report
    says why). Recompute does not apply to a plain model folder (no merge record).
    """
    from ..validation import validate as run_validation

    report = run_validation(out, spec, device=device, full=full, allow_pickle=allow_pickle,
                            allow_nonfinite=allow_nonfinite, progress=not quiet and not as_json,
                            trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(report.to_json())
    elif not quiet or not report.passed:
        click.echo(str(report))
    if report.exit_code:
        sys.exit(report.exit_code)


def print_verdict(report, quiet: bool) -> None:
    """After `merge run` / `merge fold`: one verdict line (the total time and what each check cost); with -v
    the per-check table instead. On failure the whole report and exit code 1 (the output folder stays). NOT
    CHECKED does not fail the merge, which was written: the line says NOT CHECKED and why, a warning names the
    checks, and the exit code stays 0 (`merge validate` returns 3 for it)."""
    if report is None:
        return
    verdict = str(report) if verbosity() else report.verdict()
    if report.passed:
        if not quiet:
            click.echo(verdict)
        return
    if not report.failed:
        click.echo(verdict)
        names = ", ".join(check.name for check in report.unchecked)
        click.echo(f"warning: the output in {report.path} was written, but its validation could not check "
                   f"everything ({names}); `merge validate` says why", err=True)
        return
    click.echo(str(report))
    click.echo(f"error: validation failed; the output was written and stays in {report.path} for inspection",
               err=True)
    sys.exit(1)
