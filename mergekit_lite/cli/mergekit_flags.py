"""mergekit-yaml's command line, as ``merge run`` understands it.

A mergekit user types ``merge run config.yml out --cuda --out-shard-size 1B --lazy-unpickle``. Each of
mergekit-yaml's flags (mergekit/options.py, MergeOptions) is either accepted with its meaning, accepted with
one line saying why it is not needed here, or refused with what to use instead: never guessed at. click's
"Did you mean" is kept away from the opt-ins that lower a safety check (--allow-pickle, ...): a typo must not
lead anyone to one of them.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Optional

import click

from ..errors import UsageError
from ..units import parse_size

log = logging.getLogger("mergekit_lite")

# Never offered as a guess for a flag the user did not type: each one switches off a protection.
GUARDED = ("--allow-pickle", "--allow-nonfinite", "--trust-remote-code", "--overwrite", "--allow-crimes")

# mergekit-yaml flags that change nothing here, with the reason (said in one line when given).
NOT_NEEDED = {
    "low_cpu_memory": "--low-cpu-memory: not needed, tensors are streamed one at a time and results are written "
                      "as they are made (memory holds a few tensors, not the model)",
    "clone_tensors": "--clone-tensors: not needed, every output tensor is written from its own buffer (a layer "
                     "used twice is written twice correctly)",
    "lazy_unpickle": "--lazy-unpickle: not needed, safetensors inputs are read one tensor at a time. Pickle "
                     "(*.bin) inputs are refused unless you add --allow-pickle: unpickling can run code hidden in "
                     "the file; with --allow-pickle they are read with torch.load(weights_only=True)",
}

# mergekit-yaml flags with no equivalent: refused with what to do instead (not guessed at by click).
UNSUPPORTED = {
    "--gpu-rich": "use --device cuda (one GPU; reading, merging and writing already overlap)",
    "--read-to-gpu": "use --device cuda: each tensor is moved to the GPU as it is merged",
    "--multi-gpu": "one device per merge here; use --device cuda:N, or --executor ray to spread shards over machines",
    "--transformers-cache": "set HF_HOME (or HF_HUB_CACHE) for where downloaded models go",
    "--lora-merge-cache": "adapters are folded in memory as tensors are read (model+adapter); nothing is cached",
    "--lora-merge-dtype": "adapters are folded in float32 and the result cast with --dtype / --out-dtype",
    "--unsafe-truncate-embeddings": "use the spec's tokenizer: section (tokenizer_source) to merge vocabularies",
    "--safe-serialization": "the output is always safetensors",
    "--no-safe-serialization": "the output is always safetensors; pickle output is not written",
    "--async-write": "writing already runs beside merging (a writer thread)",
    "--write-threads": "writing already runs beside merging (a writer thread)",
}

_PARAMETER_COUNT = re.compile(r"^\s*([0-9]+)\s*[bB]\s*$")
MIN_SHARD = 10**6


class MergekitCommand(click.Command):
    """`merge run`: an unknown flag of mergekit-yaml's says what to use instead; no guess is a GUARDED flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            name = exc.option_name.split("=", 1)[0]
            if name in UNSUPPORTED:
                raise click.UsageError(f"{name} is a mergekit-yaml option with no equivalent here: "
                                       f"{UNSUPPORTED[name]}.", ctx) from None
            raise unguessed(exc) from None


class GuardedGroup(click.Group):
    """The `merge` group: no subcommand's unknown-flag error suggests a GUARDED flag."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as exc:
            raise unguessed(exc) from None


def unguessed(exc: click.NoSuchOption) -> click.NoSuchOption:
    """``exc`` without the guesses that would switch a protection off (``--allow-pickel`` is not a yes)."""
    kept = [p for p in exc.possibilities or () if p not in GUARDED]
    if kept == list(exc.possibilities or ()):
        return exc
    # click ranks the candidates it is given again (difflib): giving it only the kept ones keeps them
    return click.NoSuchOption(exc.option_name, possibilities=kept or None, ctx=exc.ctx)


def mergekit_options(fn: Callable) -> Callable:
    """mergekit-yaml's flags, with its spelling and meaning."""
    options = [
        click.option("--cuda", is_flag=True, help="mergekit's spelling of --device cuda."),
        click.option("--random-seed", type=int, default=None, help="mergekit's spelling of --seed."),
        click.option("--out-shard-size", default=None, metavar="COUNT",
                     help="mergekit's shard size: 5B, 500M, 1000K (decimal; compared with tensor bytes, as "
                          "mergekit's writer does). Or use --max-shard-size."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
                     help="Copy (or merge) the tokenizer into the output."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
                     help="Write README.md (the model card) into the output."),
        click.option("--allow-crimes", is_flag=True,
                     help="Merge models whose config.json name different architectures (warned; tensor shapes "
                          "are still checked)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Copy the model's own code (the *.py files config.json's auto_map names) into the "
                          "output. Read that code first: loading the output runs it."),
        click.option("-j", "--num-threads", type=click.IntRange(min=1), default=None,
                     help="Threads that merge at once (default: one per core)."),
        click.option("--lazy-unpickle", is_flag=True, hidden=True),
        click.option("--low-cpu-memory", is_flag=True, hidden=True),
        click.option("--clone-tensors", is_flag=True, hidden=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def say_not_needed(quiet: bool, **given: bool) -> None:
    """One line for each mergekit flag given that changes nothing here (none with -q)."""
    for name, on in given.items():
        if on and not quiet:
            click.echo(f"note: {NOT_NEEDED[name]}.", err=True)


def shard_bytes(max_shard_size: Optional[str], out_shard_size: Optional[str]) -> str | int:
    """The shard size in bytes from --max-shard-size (bytes, 500MB, 2GiB) or mergekit's --out-shard-size."""
    if max_shard_size is not None and out_shard_size is not None:
        raise UsageError("give one of --max-shard-size and --out-shard-size", where="out_shard_size",
                         hint="--max-shard-size takes bytes (5GB); --out-shard-size is mergekit's count (5B)")
    if out_shard_size is not None:
        return mergekit_count(out_shard_size)
    if max_shard_size is None:
        return "5GB"
    counted = _PARAMETER_COUNT.match(max_shard_size)
    if counted:
        raise UsageError(f"'{max_shard_size}' is {int(counted.group(1)):,} bytes, which reads like mergekit's "
                         "parameter count", where="max_shard_size",
                         hint=f"--max-shard-size takes bytes: write {counted.group(1)}GB, or use mergekit's "
                              f"--out-shard-size {max_shard_size.strip()}")
    try:
        size = parse_size(max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc), where="max_shard_size") from None
    if size < MIN_SHARD:
        raise UsageError(f"'{max_shard_size}' is {size:,} bytes: shards under 1 MB would split a model into "
                         "thousands of files", where="max_shard_size",
                         hint="give a size of at least 1MB, e.g. 5GB (the default) or 500MB")
    return size


def mergekit_count(text: str) -> int:
    """mergekit's parse_kmb: a whole number with an optional K, M or B (10^3, 10^6, 10^9). mergekit's help calls
    it parameters, but its writer compares it with tensor bytes (numel * element_size), so the shards here
    break where mergekit's do: 5B -> shards of at most 5,000,000,000 bytes."""
    match = re.match(r"^\s*([0-9]+)\s*([kKmMbB]?)\s*$", str(text))
    if not match:
        raise UsageError(f"'{text}' is not a mergekit shard size", where="out_shard_size",
                         hint="write a whole number with K, M or B (thousand, million, billion), e.g. 5B")
    size = int(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]
    if size < MIN_SHARD:
        raise UsageError(f"'{text}' is under a million: shards that small would split a model into thousands "
                         "of files", where="out_shard_size", hint="mergekit's default is 5B")
    return size
