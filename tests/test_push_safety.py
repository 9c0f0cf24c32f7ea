"""What leaves the machine is exactly the model files the user meant: no link, no file of another kind, no secret,
and the bytes that were checked are the bytes that are sent; the model card's spec block cannot be broken out of.

The secrets below are built at run time from pieces, so this file itself holds nothing shaped like one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.hubcli import ROOT, TOKEN, hub_env

from mergekit_lite.hub.card_check import check_card
from mergekit_lite.output.card import card_text
from mergekit_lite.spec.references import AdapterRef, ModelPath, ModelRef

CARD = "---\nbase_model: org/a\nlibrary_name: transformers\nlicense: mit\n---\n# merged\n\nA merge.\n"
HF = "hf_" + "Ab3dE" * 7                              # 35 characters after hf_, as the Hub's tokens
PEM = "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
AWS_ID = "AKIA" + "Q3EXAMPLE7Z4TWJN"
AWS_SECRET = "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
GITHUB = "ghp_" + "x1Y2z3" * 6
GITHUB_PAT = "github_pat_" + "11ABCDEFG0" * 3
OPENAI = "sk-proj-" + "Xy9" * 10 + "T3BlbkFJ" + "Qw8" * 10
OPENAI_LEGACY = "sk-" + "a1B2c3D4" * 6
ANTHROPIC = "sk-ant-api03-" + "Zz9_" * 20
GOOGLE = "AIza" + "SyD-" + "k" * 31
SLACK = "xoxb-" + "123456789012-abcdefABCDEF"
LINK_HINT = "Hint: replace the link with a copy of the file, or remove it, then re-run\n"
SECRET_HINT = "Hint: remove it from the file (and revoke it if it was ever shared), then re-run\n"


@pytest.fixture(autouse=True)
def token(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def safetensors_bytes(metadata: dict | None = None, data: bytes = b"\0" * 8) -> bytes:
    header = {"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def model_folder(root: Path, **files: bytes | str) -> Path:
    """A pushable folder: weights, config, tokenizer, card, recipe; ``files`` add to or replace them."""
    base = {"model.safetensors": safetensors_bytes(), "config.json": '{"model_type": "llama"}',
            "tokenizer.json": '{"model": {"vocab": {"a": 0}}}', "README.md": CARD,
            "mergekit_config.yml": "merge_method: linear\nmodels:\n  - model: org/a\n"}
    root.mkdir(parents=True, exist_ok=True)
    for name, data in {**base, **files}.items():
        (root / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def dry_run(cli, folder: Path):
    result = cli("push", folder, "--repo", "user/merged", "--dry-run")
    assert "Traceback" not in result.output
    return result


def uploaded(result) -> list[str]:
    """The file names the dry run lists for upload."""
    lines = result.stdout.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("files     : "))
    return [line.split()[0] for line in lines[start + 1:] if line.startswith("  ") and
            not line.startswith("  excluded: ")]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until someone writes)."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------- links
@pytest.mark.parametrize("name, target", [
    ("tokenizer.model", "outside/id_rsa"),
    ("config.json", "/etc/passwd"),
    ("model.safetensors", "outside/model.safetensors"),
    ("tokenizer.json", "inside/tokenizer.json"),   # even a link that stays in the folder
], ids=["private-key", "etc-passwd", "weights-outside", "inside"])
def test_a_link_among_the_files_to_send_is_refused(cli, tmp_path, name, target):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text(PEM)
    (tmp_path / "outside" / "model.safetensors").write_bytes(safetensors_bytes())
    folder = model_folder(tmp_path / "out")
    (folder / "inside").mkdir()
    (folder / "inside" / "tokenizer.json").write_text("{}")
    (folder / name).unlink(missing_ok=True)
    pointed = target if target.startswith("/") or target.startswith("inside") else str(tmp_path / target)
    (folder / name).symlink_to(pointed)
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, f"error: {name}: is a link to '{pointed}'; a push never sends a "
                                                    f"link\n{LINK_HINT}")
    assert name not in uploaded(result)
    assert f"error     : is a link to '{pointed}'; a push never sends a link ({name})\n" in result.stdout
    assert "-----BEGIN" not in result.output and "root:" not in result.output


def test_links_elsewhere_in_the_folder_are_listed_and_never_followed(cli, tmp_path):
    secrets = tmp_path / "home" / ".ssh"
    secrets.mkdir(parents=True)
    (secrets / "id_rsa").write_text(PEM)
    folder = model_folder(tmp_path / "out")
    (folder / "keys").symlink_to(secrets)                        # a linked subfolder: nothing inside is looked at
    (folder / "notes.txt").symlink_to("/etc/passwd")
    (folder / ".env").symlink_to(secrets / "id_rsa")
    (folder / "runs").mkdir()
    (folder / "runs" / "config.json").symlink_to("/etc/passwd")
    result = dry_run(cli, folder)
    assert result.exit_code == 0, result.output
    assert uploaded(result) == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors",
                                "tokenizer.json"]
    assert ("  excluded: .env (hidden)\n"
            "  excluded: keys (a link, never followed)\n"
            "  excluded: notes.txt (a link, never followed)\n"
            "  excluded: runs/ (a subfolder: a merge writes none)\n") in result.stdout


def test_a_file_that_is_not_regular_is_refused_without_hanging(cli, tmp_path):
    folder = model_folder(tmp_path / "out")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    os.mkfifo(folder / "notes.fifo")
    with deadline(20):
        result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, "error: config.json: is a named pipe, not a regular file; a push "
                                                    "sends regular files only\nHint: remove it, then re-run\n")
    assert "  excluded: notes.fifo (not a regular file)\n" in result.stdout


def test_hard_links_are_regular_files_whose_bytes_are_checked(cli, tmp_path):
    """A hard link is the file itself: what it holds is checked and sent, wherever its other names are."""
    (tmp_path / "id_rsa").write_text(PEM)
    folder = model_folder(tmp_path / "out")
    (folder / "merges.txt").hardlink_to(tmp_path / "id_rsa")
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, "error: merges.txt: line 1 holds what looks like a private key; a "
                                                    f"push never sends a secret\n{SECRET_HINT}")
    (folder / "merges.txt").unlink()
    (folder / "vocab.json").hardlink_to(folder / "tokenizer.json")
    assert dry_run(cli, folder).exit_code == 0


# ---------------------------------------------------------------------------------------------- kinds
def test_only_the_kinds_a_model_repo_holds_are_sent(cli, tmp_path):
    folder = model_folder(tmp_path / "out", **{
        "tokenizer.secrets.env": f"HF_TOKEN={HF}\n", "tokenizer_backup.json": "{}", "vocab.key": "k",
        "config.json.bak": "{}", "my.model": "m", "merges.txt.orig": "m", "chat_template.py": "x",
        "model.safetensors.sig": "s", "generation_config.json": "{}", "special_tokens_map.json": "{}",
        "vocab.json": "{}", "merges.txt": "#version: 0.2\n", "chat_template.jinja": "{{ x }}",
        "adapter_config.json": "{}", "preprocessor_config.json": "{}", "added_tokens.json": "{}"})
    result = dry_run(cli, folder)
    assert result.exit_code == 0, result.output
    assert uploaded(result) == ["README.md", "adapter_config.json", "added_tokens.json", "chat_template.jinja",
                                "config.json", "generation_config.json", "mergekit_config.yml", "merges.txt",
                                "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
                                "tokenizer.json", "vocab.json"]
    for name in ("tokenizer.secrets.env", "tokenizer_backup.json", "vocab.key", "config.json.bak", "my.model",
                 "merges.txt.orig", "chat_template.py", "model.safetensors.sig"):
        assert f"  excluded: {name} (not a model file)\n" in result.stdout
    assert HF not in result.output


def test_excluded_names_are_shown_escaped(cli, tmp_path):
    """A file name cannot write fake lines (or terminal escapes) into the dry run's list."""
    folder = model_folder(tmp_path / "out", **{"x\n  config.json  1 B\x1b[2K": "x"})
    result = dry_run(cli, folder)
    assert result.exit_code == 0
    assert "  excluded: x\\n  config.json  1 B\\x1b[2K (not a model file)\n" in result.stdout


@pytest.mark.parametrize("data, why", [
    (PEM.encode(), "the header length 5135583711884815661 does not fit in a file of 95 bytes"),
    (b"\x05\0\0\0", "it is 4 bytes, too short"),
    (struct.pack("<Q", 4) + b"[1] ", "its header is not a JSON object"),
], ids=["pem", "short", "not-an-object"])
def test_weights_must_be_safetensors(cli, tmp_path, data, why):
    folder = model_folder(tmp_path / "out", **{"model.safetensors": data})
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, f"error: model.safetensors: is not a safetensors file: {why}\n"
                                                    "Hint: a push sends the safetensors files of `merge run`; remove "
                                                    "any other file named *.safetensors, then re-run\n")


def test_a_config_or_tokenizer_file_larger_than_the_limit_is_refused_unread(cli, tmp_path):
    from mergekit_lite.hub.push_files import MAX_CHECKED

    folder = model_folder(tmp_path / "out")
    with open(folder / "tokenizer.json", "r+b") as f:
        f.truncate(MAX_CHECKED + 1)                              # sparse: nothing is written
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, "error: tokenizer.json: is 268.44 MB, too large for a config or "
                                                    "tokenizer file (at most 268.44 MB)\nHint: remove it if it is not "
                                                    "the model's, then re-run\n")


# ---------------------------------------------------------------------------------------------- secrets
SECRETS = [
    ("README.md", CARD + f"\nUse it with:\n\n    HF_TOKEN={HF} python run.py\n", 12, "a Hugging Face token"),
    ("config.json", json.dumps({"model_type": "llama", "aws": AWS_ID}, indent=1), 3, "an AWS access key id"),
    ("mergekit_config.yml", f"merge_method: linear\n# {AWS_SECRET}\nmodels: []\n", 2, "an AWS secret access key"),
    ("tokenizer_config.json", json.dumps({"note": PEM}), 1, "a private key"),
    ("merges.txt", f"#version: 0.2\na b\n{GITHUB} c\n", 3, "a GitHub token"),
    ("special_tokens_map.json", json.dumps({"pat": GITHUB_PAT}), 1, "a GitHub token"),
    ("chat_template.jinja", f"{{# {OPENAI} #}}\n", 1, "an OpenAI API key"),
    ("added_tokens.json", json.dumps({OPENAI_LEGACY: 7}), 1, "an OpenAI API key"),
    ("generation_config.json", json.dumps({"k": ANTHROPIC}), 1, "an Anthropic API key"),
    ("vocab.json", json.dumps({"a": 0, GOOGLE: 1}), 1, "a Google API key"),
    ("tokenizer.json", '{"model": {"vocab": {"a": 0}},\n"x": "' + SLACK + '"}', 2, "a Slack token"),
    ("tokenizer.model", b"\x0a\x05\x0a\x01a\x15\0\0\0\0" + f"\n\n{HF}".encode() + b"\xff\xfe", 5,
     "a Hugging Face token"),
]


@pytest.mark.parametrize("name, text, line, kind", SECRETS, ids=[s[0] for s in SECRETS])
def test_a_secret_in_a_file_to_send_is_refused_and_never_printed(cli, tmp_path, name, text, line, kind):
    folder = model_folder(tmp_path / "out", **{name: text})
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, f"error: {name}: line {line} holds what looks like {kind}; a push "
                                                    f"never sends a secret\n{SECRET_HINT}")
    for secret in (HF, AWS_ID, AWS_SECRET[-40:], GITHUB, GITHUB_PAT, OPENAI, OPENAI_LEGACY, ANTHROPIC, GOOGLE, SLACK,
                   "b3BlbnNzaC1rZXktdjEAAAAA"):
        assert secret not in result.output


def test_a_secret_in_the_safetensors_metadata_is_refused(cli, tmp_path):
    folder = model_folder(tmp_path / "out", **{"model.safetensors": safetensors_bytes({"pushed_with": HF})})
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, "error: model.safetensors: its header holds what looks like a "
                                                    f"Hugging Face token; a push never sends a secret\n{SECRET_HINT}")


@pytest.mark.parametrize("text", [
    "base_model: org/sk-llama-3-8b-instruct-merge-v2-abcdefghij",   # a model name that starts like an OpenAI key
    "hf_model_config_name_that_is_long_enough_to_matter: 1",         # underscores: not a token
    "task-arithmetic-and-AIzard-and-xoxo-and-AKIAxyz-and-ghp_short",
    "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "aws_secret_access_key = ${AWS_SECRET}",
])
def test_what_only_looks_close_to_a_secret_is_not_one(text):
    assert find_secret(text.encode()) is None


def test_every_kind_is_found_where_it_is():
    data = f"line one\n{HF}\n{PEM}{AWS_ID}\n".encode()
    assert find_secret(data) == (2, "a Hugging Face token")
    assert find_secret(data.replace(HF.encode(), b"x")) == (3, "a private key")
    assert find_secret(f'{{"SecretAccessKey": "{AWS_SECRET[-40:]}"}}'.encode()) == (1, "an AWS secret access key")


def test_scanning_a_large_tokenizer_is_fast(tmp_path):
    """A 30 MB tokenizer.json (the largest in common use) is scanned in well under a few seconds."""
    import random
    import string
    import time

    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_letters + "Ġ_-", k=rng.randint(2, 14))) for _ in range(50_000)]
    data = json.dumps({"vocab": {w: i for i, w in enumerate(words)}, "merges": [f"{a} {b}" for a, b in
                                                                               zip(words, words[1:])]}).encode()
    data = (data * (30_000_000 // len(data) + 1))[:30_000_000]
    start = time.perf_counter()
    assert find_secret(data) is None
    assert time.perf_counter() - start < 5.0
    assert find_secret(data + b" " + HF.encode()) == (data.count(b"\n") + 1, "a Hugging Face token")


@pytest.mark.parametrize("index, why", [
    ("[1]", "cannot read the shard index: it is not a JSON object"),
    ("[" * 100_000, "cannot read the shard index: it is nested too deeply"),
    ('{"weight_map": "model.safetensors"}', "the shard index has no weight_map of tensor names to shard files"),
    ('{"weight_map": {"w": 1}}', "the shard index has no weight_map of tensor names to shard files"),
], ids=["list", "deep", "string", "not-names"])
def test_a_broken_index_is_reported(cli, tmp_path, index, why):
    folder = model_folder(tmp_path / "out", **{"model.safetensors.index.json": index})
    result = dry_run(cli, folder)
    assert (result.exit_code, result.stderr) == (1, f"error: model.safetensors.index.json: {why}\nHint: re-run the "
                                                    "merge; the index must list every tensor's shard\n")


@pytest.mark.parametrize("card, message", [
    ("---\ntags: " + "[" * 5000 + "]" * 5000 + "\n---\n", "metadata at line 2, column 38: the YAML is nested more "
     "than 32 levels deep"),
    ("---\na: &a [*a]\n---\n", "metadata at line 2, column 4: an alias refers to a value that contains it (a cycle)"),
    ("---\nx: !!python/object/apply:os.system [true]\n---\n", "metadata at line 2, column 4: YAML tag "
     "'!!python/object/apply:os.system' is not allowed"),
], ids=["deep", "cycle", "tag"])
def test_hostile_card_metadata_is_an_error_not_a_crash(cli, tmp_path, card, message):
    result = dry_run(cli, model_folder(tmp_path / "out", **{"README.md": card}))
    assert (result.exit_code, result.stderr) == (1, f"error: README.md: {message}\nHint: fix the front matter of "
                                                    "README.md, then re-run\n")


def test_a_card_that_is_not_utf8_is_an_error(cli, tmp_path):
    result = dry_run(cli, model_folder(tmp_path / "out", **{"README.md": b"---\nlicense: \xff\n---\n"}))
    assert (result.exit_code, result.stderr) == (1, "error: README.md: is not UTF-8 text\nHint: save README.md as "
                                                    "UTF-8, then re-run\n")
    assert "model card: (no metadata)\n" in result.stdout and "no model card" not in result.stdout


def test_a_hostile_recipe_only_costs_the_commit_message_its_details(cli, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                                          for i in range(1, 9)]
    folder = model_folder(tmp_path / "out", **{"mergekit_config.yml": "\n".join(lines) + "\nmodels: *a8\n"})
    with deadline(20):
        result = dry_run(cli, folder)
    assert result.exit_code == 0, result.output
    assert 'commit    : "Upload merged model"\n' in result.stdout


# ---------------------------------------------------------------------------------------------- what is sent
def test_selection_looks_at_the_top_level_only(tmp_path):
    from mergekit_lite.hub.push_files import select_files

    folder = model_folder(tmp_path / "out")
    deep = folder / "runs" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "model.safetensors").write_bytes(b"x")
    sent, left, refused = select_files(str(folder))
    assert [f.path for f in sent] == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors",
                                      "tokenizer.json"]
    assert [(f.path, f.reason) for f in left] == [("runs/", "a subfolder: a merge writes none")]
    assert refused == []


PUSH = """
import os, sys
from pathlib import Path
import huggingface_hub
from mergekit_lite.errors import MergeError
from mergekit_lite.hub import push

folder, outside, when = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def swap():
    if when == "link":            # the name now points at a private key
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(outside)
    else:                         # a new file under the weights' name (e.g. a merge still writing)
        os.replace(outside, folder / "model.safetensors")

if when == "link":
    plan_push = push.plan_push
    def plan_then_swap(*args, **kwargs):
        plan = plan_push(*args, **kwargs)
        swap()
        return plan
    push.plan_push = plan_then_swap
else:
    upload = huggingface_hub.HfApi.preupload_lfs_files
    def upload_then_swap(self, *args, **kwargs):
        upload(self, *args, **kwargs)
        swap()
    huggingface_hub.HfApi.preupload_lfs_files = upload_then_swap
try:
    push.push_to_hub(folder, "user/swapped", progress=False)
except MergeError as exc:
    print(exc.message(), file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("when", ["link", "weights"], ids=["link-after-the-plan", "weights-replaced-during-upload"])
def test_what_is_sent_is_what_was_checked(fake_hub, tmp_path, when):
    folder = model_folder(tmp_path / "out")
    outside = tmp_path / "outside"
    outside.write_bytes(PEM.encode() if when == "link" else safetensors_bytes(data=b"\1" * 8))
    env = hub_env(fake_hub, tmp_path / "home", xet=False)
    result = subprocess.run([sys.executable, "-c", PUSH, str(folder), str(outside), when], env=env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    name = "config.json" if when == "link" else "model.safetensors"
    assert (result.returncode, result.stderr) == (1, f"{name}: changed after it was checked (it is no longer the "
                                                     "same file); nothing was committed\nHint: let whatever is writing "
                                                     "into the folder finish, then run the same push again\n")
    assert not fake_hub.requests("POST", "/commit/")
    assert all(PEM[:20] not in json.dumps(r.body) for r in fake_hub.log)


# ---------------------------------------------------------------------------------------------- the card
HOSTILE_SPEC = """\
merge_method: linear
# a comment that closes the fence: ```
# ````
# ~~~
# ---
# license: stolen
# ---
# <script>alert(1)</script>
# ```````yaml
models:
  - model: org/a   # ```` more
"""


def find_secret(data: bytes):
    from mergekit_lite.hub.secret_scan import find_secret

    return find_secret(data)


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of ``markdown``, as a CommonMark parser reads them."""
    markdown_it = pytest.importorskip("markdown_it")
    return [t.content for t in markdown_it.MarkdownIt("commonmark").parse(markdown) if t.type == "fence"]


def test_the_spec_cannot_break_out_of_its_code_block():
    text = card_text("merged", "Linear", None, [ModelPath("org/a")], None, HOSTILE_SPEC)
    assert code_blocks(text) == [HOSTILE_SPEC]
    fence = re.search(r"^(`{3,})yaml$", text, re.M).group(1)
    assert len(fence) == 8                                       # longer than the longest run of backticks inside
    assert text.endswith(f"{fence}yaml\n{HOSTILE_SPEC}{fence}\n")
    check = check_card(text)
    assert (check.errors, check.metadata) == ([], {"base_model": ["org/a"], "base_model_relation": "merge",
                                                   "library_name": "transformers",
                                                   "tags": ["merge", "mergekit", "mergekit-lite"]})


def test_names_and_paths_cannot_add_front_matter_or_blocks():
    local = ModelPath("./x\n---\nlicense: stolen\n```\n")
    newline_id = ModelPath("org/a\n")                            # passes a `$`-anchored repo id check
    quoted = ModelPath("org/b", "v1`\n---\nlicense: 'stolen'")
    adapter = ModelRef(ModelPath("org/c"), (AdapterRef(ModelPath('./lora "x"\n# heading')),))
    text = card_text('name\n---\nlicense: "stolen"\n```', "Linear", None, [local, newline_id, adapter], quoted,
                     "merge_method: linear\n", notes=("`./x\n```\n`: a note\n# not a heading",))
    check = check_card(text)
    assert (check.errors, check.metadata) == ([], {"base_model": ["org/b", "org/c"], "base_model_relation": "merge",
                                                   "library_name": "transformers",
                                                   "tags": ["merge", "mergekit", "mergekit-lite"]})
    assert code_blocks(text) == ["merge_method: linear\n"]
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        '# name\\n---\\nlicense: "stolen"\\n```', "## Merge details", "## Configuration"]
    assert "- ```` ./x\\n---\\nlicense: stolen\\n```\\n ```` (local)\n" in text
    assert "revision `` v1`\\n---\\nlicense: 'stolen' ``" in text


def test_our_card_for_a_real_merge_still_passes(cli, models_f32, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\n# not ``` closed\nmodels:\n"
                    f"  - model: {models_f32}/ft-a\n  - model: {models_f32}/ft-b\n")
    assert cli("run", spec, "-o", tmp_path / "out", "--no-validate", "--quiet").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert code_blocks(card) == [spec.read_text()]
    result = dry_run(cli, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "README.md" in uploaded(result) and "tokenizer.json" in uploaded(result)


def test_every_file_a_merge_writes_is_one_a_push_sends():
    from mergekit_lite.hub.push_files import is_model_file
    from mergekit_lite.output.companions import TOKENIZER_FILES
    from mergekit_lite.output.writer import INDEX_NAME

    written = [*TOKENIZER_FILES, INDEX_NAME, "model.safetensors", "model-00001-of-00002.safetensors", "config.json",
               "README.md", "mergekit_config.yml", "merge_run.json"]
    assert [name for name in written if not is_model_file(name)] == []
