"""Fuzz the input parsers for a while: safetensors headers (generated and corrupted), shard indexes, spec YAML.

    python scripts/fuzz_headers.py --seconds 600          # each target gets a share of the time
    python scripts/fuzz_headers.py --seconds 60 --json    # the counts as JSON (scripts/hostile_report.py uses it)

The targets are the ones CI runs for a few seconds (tests/parser_fuzz.py). Every input must end in our own
error or in a result consistent with its bytes; any other outcome stops the run with hypothesis' minimal
failing example. At the end it prints, per target, how many inputs were tried, accepted and refused, and the
most common refusals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from helpers.parser_fuzz import (  # noqa: E402
    YAML_TEXTS,
    Outcomes,
    check_header,
    check_index,
    check_yaml,
    header_files,
    indexes,
    mutated,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def valid_file() -> bytes:
    from mergekit_lite.testing.synthetic import LlamaShape, write_model

    with tempfile.TemporaryDirectory() as folder:
        write_model(folder, LlamaShape(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1, vocab=8),
                    tokenizer=False)
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            return f.read()


def targets() -> dict[str, object]:
    valid = valid_file()
    return {
        "generated headers": (given(header_files()), lambda o: lambda data: check_header(data, o)),
        "corrupted files": (given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
                                  st.integers(-1, len(valid))),
                            lambda o: lambda edits, cut: check_header(mutated(valid, edits, cut), o)),
        "shard indexes": (given(indexes()), lambda o: lambda case: check_index(*case, o)),
        "spec YAML": (given(YAML_TEXTS), lambda o: lambda text: check_yaml(text, o)),
    }


def run(seconds: float, chunk: int = 500) -> dict[str, Outcomes]:
    found: dict[str, Outcomes] = {}
    share = seconds / len(targets())
    for name, (decorate, make) in targets().items():
        outcomes = Outcomes()
        test = settings(max_examples=chunk, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(decorate(make(outcomes)))
        stop = time.monotonic() + share
        while time.monotonic() < stop:
            test()   # a new random batch each call; raises with the minimal example on a bug
        found[name] = outcomes
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="total time, shared by the targets")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()
    found = run(args.seconds)
    if args.json:
        print(json.dumps({name: dict(o) for name, o in found.items()}, indent=2))
        return
    for name, outcomes in found.items():
        refused = {k: v for k, v in outcomes.items() if k.startswith("refused")}
        print(f"{name}: {sum(outcomes.values())} inputs, {outcomes['accepted']} accepted, "
              f"{sum(refused.values())} refused with our error, 0 other outcomes")
        for message, count in sorted(refused.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {count:7d}  {message[len('refused: '):]} ...")


if __name__ == "__main__":
    main()
