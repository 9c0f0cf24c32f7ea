"""``merge adapters A1 A2 ... -o OUT --method M``: LoRA adapters combined into one PEFT adapter."""

from __future__ import annotations

import click

from ..errors import UsageError
from .common import common_options


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"'{text}' is not a comma-separated list of numbers", where="--weights",
                         hint="e.g. --weights 0.7,0.3") from None


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output adapter folder.")
@click.option("--method", "combination_type", default="svd", show_default=True,
              help="peft's combination_type: cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, "
                   "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd.")
@click.option("--weights", help="One weight per adapter, comma-separated (default 1 each), e.g. 0.7,0.3.")
@click.option("--density", type=float, help="Fraction of entries kept by ties/dare/magnitude_prune, in (0, 1].")
@click.option("--rank", "svd_rank", type=int, help="svd_rank: rank of the new adapter for *svd methods "
                                                   "(default: the largest rank of the inputs).")
@click.option("--svd-clamp", type=float, help="Clamp the svd factors to this quantile of their values.")
@click.option("--svd-reduced", is_flag=True, help="svd_full_matrices=False: the reduced (faster) SVD.")
@click.option("--svd-driver", help="cuSOLVER driver (CUDA only; refused here, adapters combine on the CPU).")
@click.option("--majority-sign-method", type=click.Choice(["total", "frequency"]), default=None,
              help="How *ties methods elect the sign (default total).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE masks.")
@click.option("--no-check-base", is_flag=True, help="Combine even if the adapters' configs name different bases.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this tool at OUT.")
@click.option("--dry-run", is_flag=True, help="Check everything; write nothing.")
@click.option("--allow-pickle", is_flag=True, help="Load adapters that have only adapter_model.bin.")
@click.option("--no-validate", is_flag=True, help="Skip checking the adapter after writing it (merge validate).")
@click.option("--device", default="auto", show_default=True,
              help="Where the validation runs (auto, cpu, cuda, cuda:N); the combination itself runs on the CPU.")
@common_options
def adapters(adapters: tuple[str, ...], out: str, combination_type: str, weights: str | None,
             density: float | None, svd_rank: int | None, svd_clamp: float | None, svd_reduced: bool,
             svd_driver: str | None, majority_sign_method: str | None, seed: int, no_check_base: bool,
             overwrite: bool, dry_run: bool, allow_pickle: bool, no_validate: bool, device: str,
             quiet: bool) -> None:
    """Combine PEFT LoRA ADAPTERS of one base (local folders or Hub ids) into one adapter at OUT, as peft's
    add_weighted_adapter does. cat is exact (rank = sum of ranks); svd approximates the weighted sum of
    the changes at --rank; linear/ties/dare/magnitude_prune combine the factors (same ranks needed)."""
    from ..api.adapters import merge_adapters
    from ..api.failed import ValidationFailed
    from .validate import print_verdict

    try:
        result = merge_adapters(list(adapters), out, combination_type=combination_type, weights=_weights(weights),
                                density=density, svd_rank=svd_rank, svd_clamp=svd_clamp,
                                svd_full_matrices=not svd_reduced, svd_driver=svd_driver,
                                majority_sign_method=majority_sign_method or "total", seed=seed,
                                check_base=not no_check_base, overwrite=overwrite, dry_run=dry_run,
                                allow_pickle=allow_pickle, validate=not no_validate, device=device)
    except ValidationFailed as failed:   # printed as on success, then print_verdict exits 1
        result = failed.result
    if not quiet:
        click.echo(str(result))
    print_verdict(result.validation, quiet)
