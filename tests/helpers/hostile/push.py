"""Hostile inputs: a folder to push (`merge push OUT --repo user/merged --dry-run`) holding what must never leave
the machine: links (to a private key, to /etc/passwd, weights outside the folder), special files, secrets in the
files that would be sent, a file named like weights that is not, a model card whose metadata explodes.

Secrets are built from pieces, so this file holds nothing shaped like one.
"""


from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .catalogue import MODEL_FILE, Models, Scenario, case, join_file, split_file

HF_TOKEN = "hf_" + "Zq8" * 12
PRIVATE_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n"
AWS_KEY_ID = "AKIA" + "Z7" * 8
LINK_HINT = "replace the link with a copy of the file, or remove it, then re-run"
SECRET_HINT = "remove it from the file (and revoke it if it was ever shared), then re-run"


def push_case(tmp: Path, models: Models, plant: Callable[[Path], None], *outside: Path) -> Callable[..., Scenario]:
    """A copy of model ``a`` as the folder to push, with ``plant`` applied; the Scenario, given code and stderr,
    keeps the folder and the ``outside`` files byte-for-byte (a dry run changes nothing)."""
    folder = models.copy(models.a, tmp / "merged")
    plant(folder)
    args = ["push", str(folder), "--repo", "user/merged", "--dry-run"]
    return lambda code, stderr: Scenario(args, code, stderr, preserved=(folder, *outside))


def link(folder: Path, name: str, target: Path | str) -> None:
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)


@case("push")
def push_link_to_a_private_key(tmp: Path, models: Models) -> Scenario:
    key = tmp / "id_rsa"
    key.write_text(PRIVATE_KEY)
    scenario = push_case(tmp, models, lambda f: link(f, "tokenizer.json", key), key)
    return scenario(1, f"error: tokenizer.json: is a link to '{key}'; a push never sends a link\nHint: {LINK_HINT}\n")


@case("push")
def push_link_to_etc_passwd(tmp: Path, models: Models) -> Scenario:
    scenario = push_case(tmp, models, lambda f: link(f, "config.json", "/etc/passwd"))
    return scenario(1, f"error: config.json: is a link to '/etc/passwd'; a push never sends a link\nHint: {LINK_HINT}\n")


@case("push")
def push_weights_linked_from_outside_the_folder(tmp: Path, models: Models) -> Scenario:
    scenario = push_case(tmp, models, lambda f: link(f, MODEL_FILE, models.b / MODEL_FILE))
    return scenario(1, f"error: {MODEL_FILE}: is a link to '{models.b / MODEL_FILE}'; a push never sends a link\n"
                       f"Hint: {LINK_HINT}\n")


@case("push")
def push_named_pipe_as_config(tmp: Path, models: Models) -> Scenario:
    def plant(folder: Path) -> None:
        (folder / "config.json").unlink()
        os.mkfifo(folder / "config.json")    # reading it would wait forever for a writer

    return push_case(tmp, models, plant)(1, "error: config.json: is a named pipe, not a regular file; a push sends "
                                            "regular files only\nHint: remove it, then re-run\n")


@case("push")
def push_token_in_the_model_card(tmp: Path, models: Models) -> Scenario:
    card = f"---\nlibrary_name: transformers\n---\n# merged\n\n```bash\nexport HF_TOKEN={HF_TOKEN}\n```\n"
    scenario = push_case(tmp, models, lambda f: (f / "README.md").write_text(card))
    return scenario(1, "error: README.md: line 7 holds what looks like a Hugging Face token; a push never sends a "
                       f"secret\nHint: {SECRET_HINT}\n")


@case("push")
def push_private_key_in_tokenizer_config(tmp: Path, models: Models) -> Scenario:
    scenario = push_case(tmp, models, lambda f: (f / "tokenizer_config.json").write_text(
        '{\n  "unk_token": "<unk>",\n  "note": ' + repr(PRIVATE_KEY).replace("'", '"') + "\n}\n"))
    return scenario(1, "error: tokenizer_config.json: line 3 holds what looks like a private key; a push never sends "
                       f"a secret\nHint: {SECRET_HINT}\n")


@case("push")
def push_cloud_key_in_config(tmp: Path, models: Models) -> Scenario:
    def plant(folder: Path) -> None:
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text(text.replace('"architectures"', f'"aws_key": "{AWS_KEY_ID}",\n  '
                                                                            '"architectures"', 1))

    return push_case(tmp, models, plant)(1, "error: config.json: line 2 holds what looks like an AWS access key id; "
                                            f"a push never sends a secret\nHint: {SECRET_HINT}\n")


@case("push")
def push_token_in_safetensors_metadata(tmp: Path, models: Models) -> Scenario:
    def plant(folder: Path) -> None:
        header, data = split_file(folder / MODEL_FILE)
        join_file(folder / MODEL_FILE, {**header, "__metadata__": {"format": "pt", "uploader": HF_TOKEN}}, data)

    return push_case(tmp, models, plant)(1, f"error: {MODEL_FILE}: its header holds what looks like a Hugging Face "
                                            f"token; a push never sends a secret\nHint: {SECRET_HINT}\n")


@case("push")
def push_key_file_named_as_weights(tmp: Path, models: Models) -> Scenario:
    scenario = push_case(tmp, models, lambda f: (f / MODEL_FILE).write_text(PRIVATE_KEY))
    return scenario(1, f"error: {MODEL_FILE}: is not a safetensors file: the header length 5135583711884815661 does "
                       f"not fit in a file of {len(PRIVATE_KEY)} bytes\nHint: a push sends the safetensors files of "
                       "`merge run`; remove any other file named *.safetensors, then re-run\n")


@case("push")
def push_card_metadata_alias_bomb(tmp: Path, models: Models) -> Scenario:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    card = "---\n" + "\n".join(lines) + "\ntags: *a8\n---\n# merged\n"
    scenario = push_case(tmp, models, lambda f: (f / "README.md").write_text(card))
    return scenario(1, "error: README.md: metadata at line 6, column 5: the YAML expands to more than 100,000 values "
                       "through aliases\nHint: fix the front matter of README.md, then re-run\n")
