"""Finding secrets in the files a push would send: tokens, private keys, cloud keys.

A model folder is a working folder: a token pasted into the card's usage example, a private key copied over a
tokenizer file, a config that picked up an access key. Each file a push sends (the safetensors headers too) is
scanned, and a hit stops the push, naming the file, the line and the kind of secret, never the secret itself.

The patterns are those of the issuers' documented formats (the ones GitHub's secret scanning matches). Each one
starts with a fixed prefix, so a scan is one pass of a literal-only regex over the bytes, with the full pattern
tried only where a prefix occurs: a 30 MB tokenizer.json takes about 0.3 s (the full patterns as one regex would
take 10 s or more).
"""

from __future__ import annotations

import re
from typing import Optional

# (what a message calls it, the full pattern), tried in order at each prefix hit. Boundaries are lookarounds, so
# `org/sk-llama-...` or `hf_model_config` in a card are not secrets; an OpenAI key is recognised by its fixed
# `T3BlbkFJ` part (or the legacy form, exactly 48 letters and digits).
KINDS: tuple[tuple[str, re.Pattern[bytes]], ...] = tuple((kind, re.compile(pattern)) for kind, pattern in (
    ("a Hugging Face token", rb"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}"),
    ("a Hugging Face token", rb"(?<![A-Za-z0-9_])api_org_[A-Za-z0-9]{30,}"),
    ("a private key", rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ("an AWS access key id", rb"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
    ("a GitHub token", rb"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}"),
    ("a GitHub token", rb"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}"),
    ("an Anthropic API key", rb"(?<![A-Za-z0-9_-])sk-ant-[a-z]+[0-9]*-[A-Za-z0-9_-]{32,}"),
    ("an OpenAI API key", rb"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]*T3BlbkFJ[A-Za-z0-9_-]*"),
    ("an OpenAI API key", rb"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9]{48}(?![A-Za-z0-9])"),
    ("a Google API key", rb"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])"),
    ("a Slack token", rb"(?<![A-Za-z0-9_-])xox[abposr]-[0-9]{8,}-[A-Za-z0-9-]{8,}"),
))
PREFIXES = re.compile(rb"hf_|api_org_|-----BEGIN |AKIA|ASIA|gh[pousr]_|github_pat_|sk-|AIza|xox[abposr]-")
# An AWS secret key is 40 base64 characters with no prefix of its own: found by the name it is assigned to
# (aws_secret_access_key = ..., "SecretAccessKey": "..."), in any case.
AWS_SECRET_NAME = re.compile(rb"(?i)secret_?access_?key")
AWS_SECRET = re.compile(rb"(?i)secret_?access_?key[\"']?\s{0,8}[:=]\s{0,8}[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")


def find_secret(data: bytes) -> Optional[tuple[int, str]]:
    """(line, kind) of the first secret in ``data``, counting lines from 1; None when there is none."""
    found = [hit for hit in (_first_token(data), _first_aws_secret(data)) if hit is not None]
    if not found:
        return None
    position, kind = min(found)
    return data.count(b"\n", 0, position) + 1, kind


def _first_token(data: bytes) -> Optional[tuple[int, str]]:
    for prefix in PREFIXES.finditer(data):
        for kind, pattern in KINDS:
            if pattern.match(data, prefix.start()):
                return prefix.start(), kind
    return None


def _first_aws_secret(data: bytes) -> Optional[tuple[int, str]]:
    for name in AWS_SECRET_NAME.finditer(data):
        if AWS_SECRET.match(data, name.start()):
            return name.start(), "an AWS secret access key"
    return None
