"""The ``merge`` command. Each subcommand lives in its own module; this one builds the group."""

from __future__ import annotations

import gc
import os
import sys

import click

from .. import __version__
from .adapters import adapters
from .check import check
from .extract import extract
from .fold import fold
from .mergekit_flags import GuardedGroup
from .methods import methods
from .moe import moe
from .push import push
from .run import run
from .validate import validate


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mergekit_lite")
def cli() -> None:
    """Merge language models and fold LoRA adapters, streamed tensor by tensor.

    \b
    merge run SPEC.yaml OUT         run a (mergekit-compatible) merge spec; -o OUT works too
    merge fold BASE ADAPTER -o OUT  fold PEFT LoRA adapters into their base model
    merge adapters A1 A2 -o OUT     combine LoRA adapters into one (peft's add_weighted_adapter)
    merge extract --model FT --base-model BASE -o OUT
                                    a fine-tune's change as a PEFT LoRA adapter
    merge methods [NAME]            list the merge methods and their parameters
    merge validate OUT              check a merged model against its spec
    merge check SPEC...             check specs offline, without opening any model
    merge moe MOE.yml OUT           build a mixture of experts (mergekit-moe's YAML)
    merge push OUT --repo ORG/NAME  publish a merged model to the Hugging Face Hub
    """


for command in (run, fold, methods, validate, push, check, moe, extract, adapters):
    cli.add_command(command)


def main() -> None:
    # A command runs once and exits: importing torch triggers enough cyclic garbage collections to cost
    # about 0.2 s of CPU (measured), and a merge creates no reference cycles worth collecting.
    gc.disable()
    try:
        # Installed twice: `merge`, and `mergekit-lite` where `merge` is RCS's merge(1). Messages use the name typed.
        cli(prog_name="mergekit-lite" if os.path.basename(sys.argv[0]) == "mergekit-lite" else "merge")
    finally:
        # The interpreter's shutdown collects garbage over every object left, gc disabled or not: with torch
        # loaded that took 0.4 s, with transformers and peft (validation) 1.0-1.1 s, after the output was
        # complete. Frozen objects are skipped; exit handlers and finalizers still run. (Click exits through
        # SystemExit, so this runs on every path.)
        gc.freeze()
