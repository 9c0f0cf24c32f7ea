"""A bounded fuzz run of the header, index and YAML parsers (a few seconds); scripts/fuzz_headers.py runs
the same targets for longer. Every input must end in our error or in a result consistent with the bytes."""

from __future__ import annotations

from helpers.parser_fuzz import (
    YAML_TEXTS,
    Outcomes,
    check_header,
    check_index,
    check_yaml,
    header_files,
    indexes,
    mutated,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_lite.testing.synthetic import LlamaShape, write_model

BOUNDED = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES = Outcomes()


def _valid_file() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_model(folder, LlamaShape(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1, vocab=8),
                    tokenizer=False)
        with open(f"{folder}/model.safetensors", "rb") as f:
            return f.read()


VALID = _valid_file()


@BOUNDED
@given(header_files())
def test_generated_headers(data):
    check_header(data, OUTCOMES)


@BOUNDED
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.integers(-1, len(VALID)))
def test_corrupted_valid_files(edits, cut):
    check_header(mutated(VALID, edits, cut), OUTCOMES)


@BOUNDED
@given(indexes())
def test_generated_indexes(case):
    check_index(*case, OUTCOMES)


@BOUNDED
@given(YAML_TEXTS)
def test_generated_yaml(text):
    check_yaml(text, OUTCOMES)


def test_the_fuzz_run_saw_both_outcomes():
    """Guards the generators: a fuzzer that only ever produced garbage (or only valid files) tests little."""
    assert OUTCOMES["accepted"] > 10 and sum(v for k, v in OUTCOMES.items() if k.startswith("refused")) > 100
