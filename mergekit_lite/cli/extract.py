"""``merge extract --model FT --base-model BASE -o OUT``: a fine-tune's change as a PEFT LoRA adapter.

The options are mergekit-extract-lora's (0.1.5), so its command lines work with ``merge extract`` in front.
"""

from __future__ import annotations

import click

from .common import common_options, output_folder


@click.command()
@click.argument("out_arg", metavar="[OUT]", required=False)
@click.option("--model", required=True, help="The fine-tuned model: a folder or a Hub id org/name[@revision].")
@click.option("--base-model", required=True,
              help="The base model it was fine-tuned from: a folder or a Hub id org/name[@revision].")
@click.option("-o", "--out", "--out-path", "out", type=click.Path(file_okay=False),
              help="Output adapter folder (or give OUT as the argument).")
@click.option("--max-rank", type=int, default=128, show_default=True, help="Largest rank of any module.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True,
              help="Keep only singular values above this (absolute, as mergekit); each module's rank goes to "
                   "rank_pattern.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split sqrt(S) over lora_A and lora_B (else S goes into lora_A).")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="Extract the input embeddings as LoRA (else they are saved whole in modules_to_save).")
@click.option("--save-module", "save_modules", multiple=True,
              help="Save this module whole (name or last name part, e.g. lm_head); repeatable.")
@click.option("-i", "--include-regex", "include_regexes", multiple=True,
              help="Extract only modules matching this regex (re.search); repeatable.")
@click.option("-e", "--exclude-regex", "exclude_regexes", multiple=True,
              help="Leave out modules matching this regex; repeatable.")
@click.option("--skip-undecomposable", is_flag=True,
              help="Leave out norms and other tensors LoRA cannot hold, instead of saving them whole.")
@click.option("--svd", type=click.Choice(["auto", "exact", "gram", "randomized"]), default="auto", show_default=True,
              help="auto: gram for matrices with both sides >= 512, else exact; both are as close as mergekit's "
                   "SVD. gram: top singular vectors from the smaller Gram matrix (float64 eigh), exact SVD when "
                   "little is left over. randomized: faster, up to 0.3% more error on noise-like changes.")
@click.option("--out-dtype", default=None, help="Precision of the adapter's tensors (default: the model's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of ours at OUT (never other files).")
@click.option("--dry-run", is_flag=True, help="Check everything and show what would be extracted; write nothing.")
@click.option("--no-validate", is_flag=True, help="Skip checking the adapter after writing it (merge validate).")
@common_options
def extract(out_arg: str | None, out: str | None, quiet: bool, dry_run: bool, no_validate: bool, **options) -> None:
    """Extract the change from --base-model to --model as a PEFT LoRA adapter folder OUT.

    Each module's change is approximated by its truncated SVD (rank <= --max-rank). `merge fold BASE OUT`
    folds it back; peft loads it with PeftModel.from_pretrained. Hub ids are resolved and downloaded as in
    `merge run` (HF_HUB_OFFLINE=1: from the local Hub cache only).
    """
    from ..api.extract import extract_lora
    from ..api.failed import ValidationFailed
    from .validate import print_verdict

    target = output_folder(out_arg, out, "merge extract --model FT --base-model BASE")
    model, base = options.pop("model"), options.pop("base_model")
    try:
        result = extract_lora(model, base, target, dry_run=dry_run, validate=not no_validate, **options)
    except ValidationFailed as failed:   # printed as on success, then print_verdict exits 1
        result = failed.result
    if dry_run:
        click.echo(result.summary)
    elif not quiet:
        click.echo(str(result))
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    print_verdict(result.validation, quiet)
