"""``merge fold BASE ADAPTER [ADAPTER ...] -o OUT``: LoRA adapters folded into their base, as a model folder."""

from __future__ import annotations

import click

from .common import common_options
from .mergekit_flags import shard_bytes
from .run import DTYPES
from .validate import print_verdict


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="How much of each adapter's change to apply; once per adapter, in order (default 1 each).")
@click.option("--tied-embeddings", type=click.Choice(["untie", "shared"]), default="untie", show_default=True,
              help="Base ties lm_head to its embeddings: untie writes lm_head separately (computes what "
                   "base+adapter computed); shared folds into the one shared tensor, as peft does.")
@click.option("--no-check-base", is_flag=True,
              help="Fold even if an adapter's config names another base model.")
@click.option("--max-shard-size", default=None,
              help="Largest output shard in bytes, at least 1MB; accepts 500MB, 2GiB, ...  [default: 5GB]")
@click.option("--out-dtype", default=None, metavar=DTYPES, help="Precision to write (default: the base's).")
@click.option("--device", default="auto", show_default=True, metavar="[auto|cpu|cuda|cuda:N|mps]",
              help="Where to compute; auto: cuda when present, else cpu.")
@click.option("--overwrite", is_flag=True,
              help="Replace the output of an earlier merge at OUT (never a folder holding other files).")
@click.option("--dry-run", is_flag=True, help="Check everything and show the plan; write nothing.")
@click.option("--no-validate", is_flag=True, help="Skip checking the output after folding (`merge validate` later).")
@click.option("--allow-pickle", is_flag=True,
              help="Load a base or adapter that has only pickle weights, with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="Fold inputs that hold NaN or Inf instead of refusing them.")
@common_options
def fold(base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...], tied_embeddings: str,
         no_check_base: bool, max_shard_size: str | None, out_dtype: str | None, device: str, overwrite: bool,
         dry_run: bool, no_validate: bool, allow_pickle: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Fold the PEFT LoRA ADAPTERS into BASE (local folders or Hub ids org/name[@revision]) and write OUT.

    Several adapters are folded in order into the same base, each scaled by its --weight. The result equals
    peft's merge_and_unload() with the adapters active; OUT/mergekit_config.yml replays it with `merge run`.
    """
    from ..api.fold import fold_lora
    from ..api.merge import ValidationFailed

    try:
        result = fold_lora(base, list(adapters), out, list(weights) or None, tied_embeddings=tied_embeddings,
                           check_base=not no_check_base, max_shard_size=shard_bytes(max_shard_size, None),
                           out_dtype=out_dtype, device=device, overwrite=overwrite, dry_run=dry_run,
                           progress=not quiet and not dry_run, allow_pickle=allow_pickle,
                           allow_nonfinite=allow_nonfinite, validate=not no_validate)
    except ValidationFailed as failed:   # printed as on success, then print_verdict exits 1
        result = failed.result
    if dry_run:
        click.echo(result.summary)
    elif not quiet:
        click.echo(str(result).replace("Merged", "Folded", 1))
    print_verdict(result.validation, quiet)   # as `merge run`: FAILED exits 1, NOT CHECKED says so
