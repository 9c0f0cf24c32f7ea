"""The ``merge`` command. Each subcommand lives in its own module; this one builds the group."""

from __future__ import annotations

import click

from .. import __version__
from .fold import fold
from .methods import methods
from .push import push
from .run import run
from .validate import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mergekit_lite")
def cli() -> None:
    """Merge language models and fold LoRA adapters, streamed tensor by tensor.

    \b
    merge run SPEC.yaml -o OUT      run a (mergekit-compatible) merge spec
    merge fold BASE ADAPTER -o OUT  fold PEFT LoRA adapters into their base model
    merge methods [NAME]            list the merge methods and their parameters
    merge validate OUT              check a merged model against its spec
    merge push OUT --repo ORG/NAME  publish a merged model to the Hugging Face Hub
    """


for command in (run, fold, methods, validate, push):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="merge")
