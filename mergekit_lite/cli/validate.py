"""``merge validate OUT``: check that a merged model is what its spec asked for."""

from __future__ import annotations

import sys

import click

from .common import common_options


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--spec", default=None, type=click.Path(dir_okay=False),
              help="The spec to recompute from (default: OUT/mergekit_config.yml).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--full", is_flag=True, help="Recompute every tensor, not a sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the layout is in the README).")
@click.option("--allow-pickle", is_flag=True,
              help="Read sources that have only pickle weights, with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="NaN and Inf in the weights are reported but do not fail.")
@common_options
def validate(out: str, spec: str | None, device: str, full: bool, as_json: bool, allow_pickle: bool,
             allow_nonfinite: bool, quiet: bool) -> None:
    """Check the merged model in OUT: structure, NaN/Inf, recomputed tensors, a forward pass.

    Exit code 0 when every check passed or was skipped, 1 when one failed.
    """
    from ..validation import validate as run_validation

    report = run_validation(out, spec, device=device, full=full, allow_pickle=allow_pickle,
                            allow_nonfinite=allow_nonfinite)
    if as_json:
        click.echo(report.to_json())
    elif not quiet or not report.passed:
        click.echo(str(report))
    if not report.passed:
        sys.exit(1)


def print_verdict(report, quiet: bool) -> None:
    """After `merge run`: one verdict line; on failure the whole report and exit code 1 (the output folder stays)."""
    if report is None:
        return
    if report.passed:
        if not quiet:
            click.echo(report.verdict())
        return
    click.echo(str(report))
    click.echo(f"error: validation failed; the output was written and stays in {report.path} for inspection",
               err=True)
    sys.exit(1)
