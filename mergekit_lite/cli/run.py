"""``merge run SPEC.yaml OUT`` (or ``-o OUT``): check, plan and run a merge spec. mergekit-yaml's flags are
understood too (mergekit_flags.py)."""

from __future__ import annotations

from typing import Callable

import click

from ..errors import UsageError
from .common import common_options, output_folder
from .mergekit_flags import MergekitCommand, mergekit_options, say_not_needed, shard_bytes
from .validate import print_verdict

DTYPES = "[bfloat16|float16|float32|float64]"


def _output_options(fn: Callable) -> Callable:
    """Where the output goes, in which precision, on which device: -o, --max-shard-size, --dtype, ..."""
    options = [
        click.option("-o", "--out", default=None, type=click.Path(file_okay=False),
                     help="Output folder (or give OUT)."),
        click.option("--max-shard-size", default=None,
                     help="Largest output shard in bytes, at least 1MB; accepts 500MB, 2GiB, ...  [default: 5GB]"),
        click.option("--dtype", default=None, metavar=DTYPES,
                     help="Precision to merge in (overrides the spec's dtype)."),
        click.option("--out-dtype", default=None, metavar=DTYPES,
                     help="Precision to write (overrides the spec's out_dtype)."),
        click.option("--device", default=None, metavar="[auto|cpu|cuda|cuda:N|mps]",
                     help="Where to compute; auto: cuda when present, else cpu.  [default: auto]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _push_options(fn: Callable) -> Callable:
    """--push-to-hub and what the push takes: --private, and `merge push`'s --license and --base-model."""
    options = [
        click.option("--push-to-hub", default=None, metavar="ORG/NAME",
                     help="Upload the result to this Hub repo when it is written and validated."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--license", "license_id", default=None, metavar="ID",
                     help="With --push-to-hub: the license the Hub shows (apache-2.0, mit, ...), written into the "
                          "pushed card as `merge push --license` does."),
        click.option("--base-model", "base_models", multiple=True, metavar="ORG/NAME",
                     help="With --push-to-hub: a Hub model this merge comes from (repeatable; for merges of local "
                          "folders), as `merge push --base-model`."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _stage_options(fn: Callable) -> Callable:
    """Multi-stage files (mergekit-multi's): --intermediate-dir, --fuse."""
    fn = click.option("--fuse", is_flag=True, help="Multi-stage files: compute the final model in one pass, writing "
                                                   "no intermediate stage (same bytes; per-tensor merges only).")(fn)
    return click.option("--intermediate-dir", default=None, type=click.Path(file_okay=False),
                        help="Multi-stage files: where each named stage is written.  [default: OUT.stages]")(fn)


@click.command(cls=MergekitCommand)
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@_output_options
@click.option("--overwrite", is_flag=True,
              help="Replace the output of an earlier merge at OUT (never a folder holding other files).")
@click.option("--dry-run", is_flag=True, help="Check everything and show the plan; write nothing.")
@click.option("--seed", default=None, type=int, help="Seed of random methods (DARE, DELLA).  [default: 0]")
@click.option("--no-validate", is_flag=True, help="Skip checking the output after writing it (merge validate).")
@click.option("--allow-pickle", is_flag=True,
              help="Load models that have only pickle weights (*.bin), with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs that hold NaN or Inf instead of refusing them.")
@_push_options
@click.option("--resume", is_flag=True,
              help="Continue an interrupted merge of the same spec from OUT.partial (finished shards are verified "
                   "and kept).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Compute shards in this process, or as tasks on a Ray cluster (the [ray] extra).")
@click.option("--ray-address", default=None, help="Ray cluster to use (auto, host:6379, ray://host:10001); "
                                                  "default: start a local one.")
@_stage_options
@click.option("--config-from", default=None, metavar="MODEL",
              help="Which model's config.json the output takes (as the spec writes it, e.g. ./ft-b): needed when "
                   "the models disagree on rope_theta, hidden_act, ... Default: the base model, else the first.")
@mergekit_options
@common_options
def run(spec: str, out_path: str | None, out: str | None, max_shard_size: str | None, dtype: str | None,
        out_dtype: str | None, device: str | None, overwrite: bool, dry_run: bool, seed: int | None,
        no_validate: bool, allow_pickle: bool, allow_nonfinite: bool, push_to_hub: str | None, private: bool,
        license_id: str | None, base_models: tuple[str, ...], resume: bool, executor: str, ray_address: str | None,
        intermediate_dir: str | None, fuse: bool, config_from: str | None, quiet: bool, **mergekit) -> None:
    """Run the merge described by SPEC (a mergekit-compatible YAML file) into OUT.

    mergekit-yaml's command line works too: `merge run config.yml out --cuda --out-shard-size 5B`. A
    multi-stage file (mergekit-multi's) writes each named stage to OUT.stages/NAME, then the final one to OUT."""
    from ..api.merge import MergeSettings

    say_not_needed(quiet, lazy_unpickle=mergekit.pop("lazy_unpickle"), low_cpu_memory=mergekit.pop("low_cpu_memory"),
                   clone_tensors=mergekit.pop("clone_tensors"))
    settings = MergeSettings(shard_bytes(max_shard_size, mergekit.pop("out_shard_size")), dtype, out_dtype,
                             _device(device, mergekit.pop("cuda")), _seed(seed, mergekit.pop("random_seed")),
                             overwrite, dry_run, progress=not quiet, validate=not no_validate,
                             allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, push_to_hub=push_to_hub,
                             private=private, license=license_id, base_models=base_models, resume=resume,
                             executor=executor, ray_address=ray_address, config_from=config_from,
                             intermediate_dir=intermediate_dir, fuse=fuse, **mergekit)
    result = _merged(spec, output_folder(out_path, out, "merge run SPEC"), settings)
    if dry_run:
        click.echo(result.summary)
    elif not quiet:
        click.echo("\n".join(result.stages) if result.stages else str(result))
    print_verdict(result.validation, quiet)
    if result.pushed is not None and not quiet:
        click.echo(str(result.pushed))


def _merged(spec: str, out: str, settings):
    """run_merge's result, also when the validation failed: printed as on success, then print_verdict exits 1."""
    from ..api.merge import ValidationFailed, run_merge

    try:
        return run_merge(spec, out, settings)
    except ValidationFailed as failed:
        return failed.result


def _device(device: str | None, cuda: bool) -> str:
    if cuda and device is not None and device.strip().lower().split(":")[0] != "cuda":
        raise UsageError(f"--cuda asks for the GPU, --device for '{device}'", where="device",
                         hint="give one of them")
    return device if device is not None else "cuda" if cuda else "auto"


def _seed(seed: int | None, random_seed: int | None) -> int:
    if seed is not None and random_seed is not None and seed != random_seed:
        raise UsageError(f"--seed {seed} and --random-seed {random_seed} disagree", where="seed",
                         hint="--random-seed is mergekit's spelling of --seed; give one")
    return seed if seed is not None else random_seed if random_seed is not None else 0
