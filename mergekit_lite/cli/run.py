"""``merge run SPEC.yaml -o OUT``: check, plan and run a merge spec."""

from __future__ import annotations

import click

from .common import common_options
from .validate import print_verdict


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard in bytes; accepts 500MB, 2GiB, ...")
@click.option("--dtype", default=None, help="Precision to merge in (overrides the spec's dtype).")
@click.option("--out-dtype", default=None, help="Precision to write (overrides the spec's out_dtype).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True,
              help="Replace the output of an earlier merge at OUT (never a folder holding other files).")
@click.option("--dry-run", is_flag=True, help="Check everything and show the plan; write nothing.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random methods (DARE, DELLA).")
@click.option("--no-validate", is_flag=True, help="Skip checking the output after writing it (merge validate).")
@click.option("--allow-pickle", is_flag=True,
              help="Load models that have only pickle weights (*.bin), with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs that hold NaN or Inf instead of refusing them.")
@click.option("--push-to-hub", default=None, metavar="ORG/NAME",
              help="Upload the result to this Hub repo when it is written and validated.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted merge of the same spec from OUT.partial (finished shards are verified "
                   "and kept).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Compute shards in this process, or as tasks on a Ray cluster (the [ray] extra).")
@click.option("--ray-address", default=None, help="Ray cluster to use (auto, host:6379, ray://host:10001); "
                                                  "default: start a local one.")
@click.option("--config-from", default=None, metavar="MODEL",
              help="Which model's config.json the output takes (as the spec writes it, e.g. ./ft-b): needed when "
                   "the models disagree on rope_theta, hidden_act, ... Default: the base model, else the first.")
@common_options
def run(spec: str, out: str, max_shard_size: str, dtype: str | None, out_dtype: str | None, device: str,
        overwrite: bool, dry_run: bool, seed: int, no_validate: bool, allow_pickle: bool, allow_nonfinite: bool,
        push_to_hub: str | None, private: bool, resume: bool, executor: str, ray_address: str | None,
        config_from: str | None, quiet: bool) -> None:
    """Run the merge described by SPEC (a mergekit-compatible YAML file) into OUT."""
    from ..api.merge import MergeSettings, run_merge

    settings = MergeSettings(max_shard_size, dtype, out_dtype, device, seed, overwrite, dry_run,
                             progress=not quiet and not dry_run, validate=not no_validate, allow_pickle=allow_pickle,
                             allow_nonfinite=allow_nonfinite, push_to_hub=push_to_hub, private=private,
                             resume=resume, executor=executor, ray_address=ray_address, config_from=config_from)
    result = run_merge(spec, out, settings)
    if dry_run:
        click.echo(result.summary)
    elif not quiet:
        click.echo(str(result))
    print_verdict(result.validation, quiet)
    if result.pushed is not None and not quiet:
        click.echo(str(result.pushed))
