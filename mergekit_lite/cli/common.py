"""What every subcommand shares: logging flags, and turning errors into messages and exit codes."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import click

from ..errors import Interrupted, MergeError, UsageError
from ..hub.client import quiet_hub

# The library names a bad setting by its Python name (``run_merge(..., max_shard_size=...)``); on the command
# line it is the option's name.
FLAGS = {"max_shard_size": "--max-shard-size", "dtype": "--dtype", "out_dtype": "--out-dtype", "device": "--device",
         "private": "--private", "push_to_hub": "--push-to-hub", "executor": "--executor",
         "ray_address": "--ray-address", "config_from": "--config-from", "out": "OUT",
         "out_shard_size": "--out-shard-size", "seed": "--seed", "num_threads": "--num-threads",
         "license": "--license", "base_models": "--base-model", "intermediate_dir": "--intermediate-dir",
         "fuse": "--fuse"}


VERBOSE = "mergekit_lite.verbose"   # click context meta key: how many -v were given


def verbosity() -> int:
    """How many -v the running command was given (0 outside a command)."""
    context = click.get_current_context(silent=True)
    return context.meta.get(VERBOSE, 0) if context is not None else 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("mergekit_lite")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def common_options(fn: Callable) -> Callable:
    """-v/--quiet/--debug, and the error policy: our errors print one message and exit with their code;
    anything else is a bug and says so (with the traceback only under --debug)."""

    @click.option("-v", "--verbose", count=True, help="More output (-vv for debug logging).")
    @click.option("-q", "--quiet", is_flag=True, help="Only errors: no progress bar, no summary.")
    @click.option("--debug", is_flag=True, help="Show the Python traceback of any error.")
    @functools.wraps(fn)
    def wrapper(*args, verbose: int, quiet: bool, debug: bool, **kwargs):
        setup_logging(verbose, quiet)
        context = click.get_current_context(silent=True)
        if context is not None:   # for what prints more with -v (cli/validate.py's verdict)
            context.meta[VERBOSE] = verbose
        try:
            with quiet_hub(quiet):   # -q: no huggingface_hub bar either ("Fetching N files")
                return fn(*args, quiet=quiet, **kwargs)
        except MergeError as exc:
            if debug:
                raise
            if isinstance(exc, UsageError) and exc.where in FLAGS:
                exc.where = FLAGS[exc.where]
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            click.echo(f"interrupted: {exc if isinstance(exc, Interrupted) else 'nothing was written'}", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug in our code, not in the user's input
            if debug:
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc}\n"
                       "This is a bug in mergekit_lite; re-run with --debug for the traceback and report it.", err=True)
            sys.exit(1)

    return wrapper


def output_folder(positional: str | None, option: str | None, usage: str) -> str:
    """OUT given as an argument (mergekit's CONFIG OUT) or with -o; both only if they agree. ``usage`` is the
    command line to show, such as ``merge run SPEC``."""
    if positional is not None and option is not None and positional != option:
        raise UsageError(f"two output folders given: OUT '{positional}' and -o '{option}'", where="out",
                         hint=f"give one: `{usage} OUT` or `{usage} -o OUT`")
    if positional is None and option is None:
        raise UsageError("no output folder given", where="out", hint=f"`{usage} OUT` or `{usage} -o OUT`")
    return positional if positional is not None else option
