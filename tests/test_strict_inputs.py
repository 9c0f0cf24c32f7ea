"""Strict inputs: what a user's folder holds is read bounded and unambiguously, and user patterns match in bounded
time. The CLI cases that cannot hang are in tests/helpers/hostile/strict.py; here are the ones that would hang
(run with a timeout: a thread for a FIFO, a subprocess for a regex or a device), and the readers' own rules.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.hostile import MODEL_FILE, Models, build_models, linear_spec

from mergekit_lite.errors import ModelError, SpecError
from mergekit_lite.lora import patterns
from mergekit_lite.lora.patterns import SUFFIX, Pattern
from mergekit_lite.sources.user_files import NestedTooDeeply, parse_json_file, read_json_object
from mergekit_lite.spec.safe_yaml import load_yaml, read_spec_file
from mergekit_lite.testing.adapters import write_adapter

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
NOT_REGULAR = "is a named pipe (FIFO), not a regular file"
CORRUPT = "the file is corrupt; download it again"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("tiny"))


# ------------------------------------------------------------------ helpers: hangs end in a failure, not a hung suite

def _release(fifo: Path) -> None:
    """Open the FIFO for writing and close it: a reader blocked in open() or read() gets end-of-file."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def bounded(call, fifos: tuple[Path, ...], timeout: float = 30):
    """``call()`` in a thread; if it is still blocked after ``timeout`` s, release the FIFOs and fail."""
    done: dict = {}

    def target() -> None:
        try:
            done["value"] = call()
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            done["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            _release(fifo)
        thread.join(10)
        pytest.fail(f"blocked for {timeout} s on a FIFO")
    if "error" in done:
        raise done["error"]
    return done["value"]


def fifo_in_place_of(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def merge_process(*args, timeout: float = 120, memory: int = 4 << 30) -> subprocess.CompletedProcess:
    """`merge ARGS...` in a subprocess that cannot hang the suite (timeout) or take the machine's memory."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.run([sys.executable, "-m", "mergekit_lite", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env, preexec_fn=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`merge {args[0]}` ran for more than {timeout} s")


# ------------------------------------------------------------------ files that are not regular files

@pytest.mark.parametrize("name", ["config.json", INDEX])
def test_a_fifo_in_a_model_folder_is_refused_without_waiting(cli, tiny, tmp_path, name):
    bad = tiny.copy(tiny.sharded, tmp_path / "bad")
    fifo = fifo_in_place_of(bad / name)
    spec = linear_spec(tmp_path, tiny.a, bad)
    result = bounded(lambda: cli("run", spec, "-o", tmp_path / "out", "--no-validate", "--quiet"), (fifo,))
    expected = (f"cannot read config.json: {NOT_REGULAR}\nHint: {CORRUPT}" if name == "config.json" else
                f"cannot read the shard index: {NOT_REGULAR}\nHint: the index must be a regular file; download it "
                "again")
    assert (result.exit_code, result.stderr) == (1, f"error: {fifo}: models[1].model: {expected}\n")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "out").exists()


def test_a_fifo_adapter_config_is_refused_without_waiting(cli, tiny, tmp_path):
    adapter = tmp_path / "adapter"
    write_adapter(str(adapter), build_shape())
    fifo = fifo_in_place_of(adapter / "adapter_config.json")
    result = bounded(lambda: cli("fold", tiny.a, adapter, "-o", tmp_path / "out", "--no-check-base", "--quiet"),
                     (fifo,))
    assert (result.exit_code, result.stderr) == (1, f"error: {adapter}: cannot read adapter_config.json: "
                                                    f"{NOT_REGULAR}\nHint: the file is corrupt; download the adapter "
                                                    "again\n")


def test_a_tokenizer_file_that_is_a_fifo_is_refused_before_the_merge(cli, tiny, tmp_path):
    """It used to be skipped without a word (the output lacked its tokenizer.json); now the run stops first."""
    source = tiny.copy(tiny.a, tmp_path / "tok")
    fifo = fifo_in_place_of(source / "tokenizer.json")
    spec = linear_spec(tmp_path, source, tiny.b, extra=f"tokenizer_source: {source}\n")
    result = bounded(lambda: cli("run", spec, "-o", tmp_path / "out", "--no-validate", "--quiet"), (fifo,))
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.stderr == (f"error: {source}: cannot copy tokenizer.json: {NOT_REGULAR}\n"
                             "Hint: it must be a regular file; download the model's files again\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_character_device_named_config_json_is_refused(tiny, tmp_path):
    """/dev/zero under the name config.json, inside the folder (a link to it is refused as leaving the folder):
    read whole, it never ends. In a subprocess with a memory limit, so a regression cannot take the machine."""
    bad = tiny.copy(tiny.a, tmp_path / "bad")
    (bad / "config.json").unlink()
    os.mknod(bad / "config.json", 0o444 | stat.S_IFCHR, os.makedev(1, 5))
    spec = linear_spec(tmp_path, tiny.b, bad)
    result = merge_process("run", spec, "-o", tmp_path / "out", "--no-validate", "--quiet", timeout=60)
    assert (result.returncode, result.stderr) == (1, (
        f"error: {bad / 'config.json'}: models[1].model: cannot read config.json: is a character device, not a "
        f"regular file\nHint: {CORRUPT}\n"))


def test_a_link_to_a_device_named_config_json_is_refused(cli, tiny, tmp_path):
    bad = tiny.copy(tiny.a, tmp_path / "bad")
    (bad / "config.json").unlink()
    (bad / "config.json").symlink_to("/dev/zero")
    result = cli("run", linear_spec(tmp_path, tiny.b, bad), "-o", tmp_path / "out", "--no-validate", "--quiet")
    assert (result.exit_code, result.stderr) == (1, f"error: {bad}: models[1].model: config.json is a link that "
                                                    "leaves the model folder\nHint: refusing it: copy the real file "
                                                    "into the folder\n")


def test_a_spec_that_is_a_fifo_or_a_device_is_refused_without_waiting(tmp_path):
    fifo = fifo_in_place_of(tmp_path / "spec.yaml")
    with pytest.raises(SpecError) as refused:
        bounded(lambda: read_spec_file(str(fifo)), (fifo,))
    assert str(refused.value) == f"{fifo}: cannot read the spec: {NOT_REGULAR}\nHint: check the path of the YAML file"
    with pytest.raises(SpecError, match="cannot read the spec: is a character device, not a regular file"):
        read_spec_file("/dev/zero")
    (tmp_path / "ok.yaml").write_text("merge_method: linear\n")
    assert read_spec_file(str(tmp_path / "ok.yaml")) == "merge_method: linear\n"
    (tmp_path / "big.yaml").write_text("#" * (5 << 20))      # read only as far as load_yaml's own limit needs
    assert len(read_spec_file(str(tmp_path / "big.yaml"))) == (4 << 20) + 1


def test_a_token_file_that_is_a_fifo_does_not_hang_a_dry_run(tmp_path, monkeypatch):
    from mergekit_lite.hub import client

    fifo = fifo_in_place_of(tmp_path / "token")
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(client.client().constants, "HF_TOKEN_PATH", str(fifo))
    assert bounded(client.token_source, (fifo,)) is None
    (tmp_path / "real").write_text("hf_abcdefghijkl\n")
    monkeypatch.setattr(client.client().constants, "HF_TOKEN_PATH", str(tmp_path / "real"))
    assert client.token_source() == f"the token file {tmp_path / 'real'} (from `hf auth login`)"


# ------------------------------------------------------------------ the JSON reader

def test_json_reader_bounds_and_messages(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1, "a": 2}')
    assert parse_json_file(str(path)) == {"a": 2}                         # as json.load (transformers, peft)
    with pytest.raises(ModelError) as twice:
        read_json_object(str(path), "x.json", "blame", "hint", unique=True)
    assert str(twice.value) == "blame: x.json has the key 'a' twice\nHint: hint"
    with pytest.raises(OSError, match="is 16 bytes, more than the 15 allowed"):
        parse_json_file(str(path), limit=15)
    path.write_text("[" * 100_000)
    with pytest.raises(NestedTooDeeply):
        parse_json_file(str(path))
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="can't decode byte 0xff"):
        parse_json_file(str(path))
    path.write_text('{"n": -' + "9" * 4301 + "}")
    with pytest.raises(ValueError, match="^holds an integer of 4,301 digits, more than the 4,300 read$"):
        parse_json_file(str(path))
    path.write_text('{"n": -' + "9" * 4300 + ", \"f\": 1e999}")
    assert parse_json_file(str(path))["f"] == float("inf")
    path.write_text("[1]")
    with pytest.raises(ModelError, match="^blame: x.json is not a JSON object$"):
        read_json_object(str(path), "x.json", "blame", "hint")


def test_no_json_of_a_user_file_is_parsed_around_the_reader():
    """Every json.load/json.loads under mergekit_lite/ goes through sources/user_files.py, except where the bytes
    were read bounded, from a regular file, by the module itself: the safetensors header (its length checked
    against the file), the resume journal, and in a push (without torch) the shard index and the run record it
    publishes."""
    allowed = {"sources/user_files.py", "safetensors_format.py", "output/journal.py", "hub/push_plan.py",
               "hub/push_files.py"}
    found = []
    for path in sorted((ROOT / "mergekit_lite").rglob("*.py")):
        rel = path.relative_to(ROOT / "mergekit_lite").as_posix()
        if rel.startswith("testing/") or rel in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bjson\.loads?\(", line):
                found.append(f"{rel}:{number}")
    assert found == []


# ------------------------------------------------------------------ which weights a folder holds

def test_an_index_that_names_only_model_safetensors_is_one_reading(tiny, tmp_path):
    from mergekit_lite.sources.opener import open_checkpoint

    folder = tiny.copy(tiny.a, tmp_path / "both")
    names = json.loads(json.dumps(list(open_checkpoint(str(tiny.a)).tensors)))
    (folder / INDEX).write_text(json.dumps({"weight_map": {n: MODEL_FILE for n in names}}))
    assert set(open_checkpoint(str(folder)).tensors) == set(names)


def test_transformers_loads_model_safetensors_before_the_index(tiny, tmp_path):
    """The rule refuse_two_layouts cites, checked against the installed transformers."""
    modeling = pytest.importorskip("transformers.modeling_utils")
    resolve = getattr(modeling, "_get_resolved_checkpoint_files", None)
    if resolve is None:
        pytest.skip("this transformers resolves weights elsewhere")
    folder = tiny.copy(tiny.sharded, tmp_path / "both")
    shutil.copyfile(tiny.b / MODEL_FILE, folder / MODEL_FILE)
    files, _ = resolve(str(folder), None, None, None, None, False)
    assert [os.path.basename(f) for f in files] == [MODEL_FILE]


def test_validation_says_which_file_transformers_loads(tiny, tmp_path):
    from mergekit_lite.validation.folder import read_output

    folder = tiny.copy(tiny.sharded, tmp_path / "both")
    shutil.copyfile(tiny.b / MODEL_FILE, folder / MODEL_FILE)
    messages = [f.message for f in read_output(str(folder)).findings if f.file == MODEL_FILE]
    assert messages == [f"is beside {INDEX}, which does not list it: transformers loads it instead of the index, "
                        "other loaders the index's shards"]


# ------------------------------------------------------------------ YAML keys

@pytest.mark.parametrize("text, value", [
    ("d: &d {weight: 1, density: 0.5}\np:\n  <<: *d\n  weight: 2\n", {"weight": 2, "density": 0.5}),   # override
    ("a: &a {weight: 1}\nb: &b {density: 2}\np: {<<: [*a, *b]}\n", {"weight": 1, "density": 2}),
    ("a: &a {weight: 1}\np: {<<: [*a, *a]}\n", {"weight": 1}),                                   # the same mapping
    ("a: &a {weight: 1}\nb: &b {weight: 2}\np:\n  <<: [*a, *b]\n  weight: 3\n", {"weight": 3}),    # set beside <<
    ("a: &a {w: 1}\nb: &b\n  <<: *a\n  weight: 2\np:\n  <<: *b\n", {"w": 1, "weight": 2}),        # merges in merges
])
def test_merge_keys_that_mean_one_thing_are_read(text, value):
    assert load_yaml(text, None)["p"] == value


@pytest.mark.parametrize("text, where, what", [
    ("x:\n  1: a\n  1.0: b\n", "line 3, column 3", "the key '1.0' is written twice in one mapping, at lines 2 and 3"),
    ("x: {true: a, 1: b}\n", "line 1, column 14", "the key '1' is written twice in one mapping, at line 1, columns 5 "
                                                  "and 14"),
    ("x:\n- {a: 1}\n- {b: 1, b: 2}\n", "line 3, column 10", "the key 'b' is written twice in one mapping, at line 3, "
                                                            "columns 4 and 10"),
    ("a: &a {w: 1}\nb: &b\n  <<: *a\n  x: 1\nd: &d {w: 5}\nc: {<<: [*b, *d]}\n", "line 6, column 5",
     "the key 'w' is set by two of the mappings merged here, at lines 1 and 5, and YAML readers disagree on "
     "which one wins"),
])
def test_keys_that_mean_two_things_are_refused(text, where, what):
    with pytest.raises(SpecError) as refused:
        load_yaml(text, "spec.yaml")
    assert (refused.value.where, refused.value.what) == (where, what)


def test_a_spec_of_many_keys_is_checked_quickly():
    text = "".join(f"k{i}: {{a: 1, b: 2}}\n" for i in range(2_000))
    start = time.perf_counter()
    assert len(load_yaml(text, None)) == 2_000
    assert time.perf_counter() - start < 20


# ------------------------------------------------------------------ user regular expressions

def test_a_pattern_that_hangs_re_ends_the_fold_quickly(tiny, tmp_path):
    """`(.|.)*X` made `merge fold` backtrack for hours in re; the regex engine answers at once (no module has an
    X) and the adapter is refused for what it is."""
    adapter = tmp_path / "adapter"
    write_adapter(str(adapter), build_shape())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "(.|.)*X"}))
    start = time.perf_counter()
    result = merge_process("fold", tiny.a, adapter, "-o", tmp_path / "out", "--no-check-base", "--quiet", timeout=90)
    assert (result.returncode, result.stderr) == (1, (
        f"error: {adapter}: target_modules '(.|.)*X' matches no module of the base\nHint: the adapter was made for "
        "another architecture; use the base it was trained on\n"))
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("pattern", ["q_proj", r"layers\.[0-9]+\.self_attn\.(q|k|v)_proj", "^model.layers.1.mlp",
                                     r"(?P<x>proj)", r".*\.(up|down)_proj", "mlp|self_attn",
                                     r"[^.]+_proj", r"\w+(?=_proj)_proj", r"(a)?(?(1)x|q)_proj"])
def test_patterns_match_as_re_does(pattern):
    """The regex engine gives re's answer for every pattern re accepts (peft uses re)."""
    modules = [f"model.layers.{i}.{part}" for i in range(3) for part in
               ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")]
    for template in ("{}", SUFFIX):
        compiled = Pattern(pattern, "key", None, template)
        full = template.format(pattern)
        for module in modules:
            assert compiled.match(module) == bool(re.match(full, module)), (template, module)
            assert compiled.fullmatch(module) == bool(re.fullmatch(full, module)), (template, module)


def test_a_pattern_has_one_budget_for_all_its_matches(monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_BUDGET", 0.3)
    slow = Pattern("(.|.)*q", "target_modules", "adapter")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"^adapter: target_modules '\(\.\|\.\)\*q' takes more than 0\.3 s"):
        for _ in range(100):
            slow.fullmatch("model.layers.0.self_attn.q_proj")
    assert time.perf_counter() - start < 5
    fast = Pattern("q_proj", "target_modules", "adapter")
    assert all(fast.fullmatch("q_proj") for _ in range(10_000))   # microseconds each: far from any budget
    again = pickle.loads(pickle.dumps(fast))                       # sent to Ray workers with its LoRA source
    assert again.fullmatch("q_proj") and not again.fullmatch("k_proj")


@pytest.mark.parametrize("source, what", [
    (7, "key is 7, not a string"),
    ("a" * 1001, "characters long, more than the 1,000 read"),
    ("(" * 400 + ")" * 400, "is nested too deeply"),
    ("(?<=a+)b", "look-behind requires fixed-width pattern"),
    (r"\p{L}", "bad escape \\p at position 0"),
    ("(a{200}){200}", "repeats fixed counts to more than 10,000 items"),
])
def test_patterns_peft_would_refuse_or_that_cannot_be_matched_safely(source, what):
    start = time.perf_counter()
    with pytest.raises(ModelError) as refused:
        Pattern(source, "key", "adapter")
    assert what in str(refused.value) and "Traceback" not in str(refused.value)
    assert time.perf_counter() - start < 5


def build_shape():
    from helpers.hostile.catalogue import TINY

    return TINY


def test_a_fifo_pickle_is_refused_without_waiting(cli, tiny, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(tiny.b / "config.json", folder / "config.json")
    fifo = fifo_in_place_of(folder / "pytorch_model.bin")
    spec = linear_spec(tmp_path, tiny.a, folder)
    result = bounded(lambda: cli("run", spec, "-o", tmp_path / "out", "--allow-pickle", "--no-validate", "--quiet"),
                     (fifo,))
    assert (result.exit_code, result.stderr) == (1, f"error: {fifo}: models[1].model: cannot read: {NOT_REGULAR}\n"
                                                    "Hint: give the model's weight files themselves\n")
