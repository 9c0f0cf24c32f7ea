"""``merge moe MOE.yml OUT`` (or ``-o OUT``): build a mixture of experts from dense models, from a mergekit-moe
file (api/moe.py)."""

from __future__ import annotations

import click

from .common import common_options, output_folder
from .run import _device
from .validate import print_verdict


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--out", default=None, type=click.Path(file_okay=False), help="Output folder (or give OUT).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard in bytes (500MB, 2GiB).")
@click.option("--device", default=None, metavar="[auto|cpu|cuda|cuda:N|mps]",
              help="Where gate_mode hidden runs the base model.  [default: auto]")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of random routers and noise_scale (as mergekit-moe's --random-seed).")
@click.option("--random-seed", "random_seed", default=None, type=int, hidden=True)
@click.option("--overwrite", is_flag=True, help="Replace the output of an earlier merge at OUT.")
@click.option("--dry-run", is_flag=True, help="Check everything; write nothing.")
@click.option("--no-validate", is_flag=True, help="Skip checking the output after writing it.")
@click.option("--allow-pickle", is_flag=True, help="Load models that have only pickle weights (*.bin).")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Build the MoE even when every expert is the same model (mergekit-moe's flag).")
@common_options
def moe(spec: str, out_path: str | None, out: str | None, max_shard_size: str, device: str | None, seed: int,
        random_seed: int | None, overwrite: bool, dry_run: bool, no_validate: bool, allow_pickle: bool,
        allow_all_same: bool, quiet: bool) -> None:
    """Build a mixture of experts from SPEC (a mergekit-moe YAML file) into OUT.

    Mixtral, Qwen2-MoE or Qwen3-MoE output, routers from prompts (gate_mode hidden, cheap_embed) or random."""
    from ..api.merge import MergeSettings
    from ..api.moe import run_moe

    settings = MergeSettings(max_shard_size, device=_device(device, False),
                             seed=random_seed if random_seed is not None else seed, overwrite=overwrite,
                             dry_run=dry_run, progress=not quiet and not dry_run, validate=not no_validate,
                             allow_pickle=allow_pickle)
    result = run_moe(spec, output_folder(out_path, out, "merge moe MOE.yml"), settings, allow_all_same=allow_all_same)
    if dry_run:
        click.echo(result.summary)
    elif not quiet:
        click.echo(str(result))
    print_verdict(result.validation, quiet)
