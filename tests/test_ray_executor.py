"""`--executor ray`: shards computed as Ray tasks (a local Ray instance with 2 workers) give the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.models import write_spec

from mergekit_lite import run_merge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("tiny_shards")
SHARD = "30kB"   # the tiny models' output in 15 shards: 15 tasks over 2 workers
# `merge` in a process of its own that, like the tiny_shards fixture, takes shard sizes under 1 MB
SMALL_SHARDS_CLI = "import mergekit_lite.cli.mergekit_flags as f; f.MIN_SHARD = 1; from mergekit_lite.cli import main; main()"


def spec_text(root: Path) -> str:
    return textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {root}/base
        models:
          - model: {root}/ft-a
            parameters: {{weight: 0.7}}
          - model: {root}/ft-b
            parameters: {{weight: [0.2, 0.6]}}
        dtype: bfloat16
        """)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs (so 2 task workers) for this module; its address for other drivers."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def local_output(models_bf16, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "local" / "merged"
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, validate=False)
    assert result.shards == 15
    return folder_bytes(out)


def test_ray_executor_writes_the_same_bytes_as_local(ray_cluster, models_bf16, tmp_path, local_output):
    import ray

    out = tmp_path / "ray" / "merged"
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, executor="ray",
                       validate=False)
    assert result.shards == 15 and folder_bytes(out) == local_output
    workers = {node["NodeID"] for node in ray.nodes()}
    assert len(workers) == 1 and ray.cluster_resources()["CPU"] == 2


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_ray_runs_chunked_methods_to_the_same_bytes(ray_cluster, models_bf16, tmp_path, method):
    """Whole-tensor methods run in passes over chunks (one thread in a Ray task, two locally): same bytes."""
    if method == "slerp":
        spec = (f"merge_method: slerp\nbase_model: {models_bf16}/base\nmodels:\n  - model: {models_bf16}/ft-a\n"
                "parameters: {t: [0.2, 0.8]}\n")
    else:
        spec = spec_text(models_bf16).replace("task_arithmetic", method).replace(
            "{weight: 0.7}", "{weight: 0.7, density: 0.4}")
    local, ray_out = tmp_path / "local" / "merged", tmp_path / "ray" / "merged"   # the card names the folder
    run_merge(spec, local, max_shard_size=SHARD, progress=False, validate=False, seed=5)
    run_merge(spec, ray_out, max_shard_size=SHARD, progress=False, validate=False, seed=5, executor="ray")
    assert folder_bytes(ray_out) == folder_bytes(local)


def test_cli_connects_to_a_running_cluster(ray_cluster, models_bf16, tmp_path, local_output):
    """A second driver process joins the cluster by address, as on a real cluster's head node."""
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "ray" / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SMALL_SHARDS_CLI, "run", str(spec), "-o", str(out), "--quiet",
                           "--no-validate", "--max-shard-size", SHARD,
                           "--executor", "ray", "--ray-address", ray_cluster],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == local_output


def test_a_plan_pickles_for_ray_tasks_lora_folds_included(tmp_path, monkeypatch):
    """What Ray sends each task: the plan, pickled (no open files or locks); a shard written from the copy
    is the same as one written from the original."""
    import pickle

    import torch

    from mergekit_lite import make_plan
    from mergekit_lite.engine.loop import write_shard
    from mergekit_lite.plan.shards import output_layout
    from mergekit_lite.testing.adapters import write_demo_adapters
    from mergekit_lite.testing.synthetic import LlamaShape, write_demo_models

    shape = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
    write_demo_models(str(tmp_path / "demo" / "models"), shape, max_shard_size=60_000)
    write_demo_adapters(str(tmp_path / "demo" / "adapters"), shape)
    monkeypatch.chdir(tmp_path)
    plan = make_plan((ROOT / "merge_configs" / "lora_fold.yaml").read_text())
    copy = pickle.loads(pickle.dumps(plan))
    try:
        (source,) = plan.checkpoints.values()
        shard = next(s for s in output_layout(plan, 40_000) if any(e.name in source.recipes for e in s.entries))
        write_shard(plan, shard, str(tmp_path / "a.safetensors"), torch.device("cpu"))
        write_shard(copy, shard, str(tmp_path / "b.safetensors"), torch.device("cpu"))
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    finally:
        plan.close()
        copy.close()


def test_executor_usage_errors(cli, models_bf16, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    result = cli("run", spec, "-o", tmp_path / "out", "--ray-address", "auto")
    assert result.exit_code == 2
    assert result.stderr == "error: --ray-address: --ray-address needs --executor ray\n"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = cli("run", spec, "-o", tmp_path / "out", "--executor", "ray")
    assert result.exit_code == 2
    assert result.stderr == ("error: --executor: --executor ray needs Ray, which is not installed\n"
                             "Hint: install the extra: pip install 'mergekit-lite[ray]'\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- failures inside Ray tasks (hostile inputs)

def test_an_error_in_a_ray_task_is_the_same_error_as_local(ray_cluster, models_bf16, tmp_path, cli):
    """A NaN in one input is found by the task that reads it, on a worker: the user sees the same message and
    exit code as with the local executor, not Ray's wrapped traceback; no output appears."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path / "models"
    shutil.copytree(models_bf16, root)
    damaged = sorted((root / "ft-b").glob("*.safetensors"))[-1]
    tensors = load_file(damaged)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, damaged, metadata={"format": "pt"})
    spec = write_spec(tmp_path / "spec.yaml", spec_text(root))
    run = ("run", spec, "--max-shard-size", SHARD, "--quiet", "--no-validate")
    local = cli(*run, "-o", tmp_path / "local")
    on_ray = cli(*run, "-o", tmp_path / "ray", "--executor", "ray")
    assert local.exit_code == on_ray.exit_code == 1
    assert on_ray.stderr == local.stderr and f"tensor '{name}'" in local.stderr and "NaN" in local.stderr
    assert f"error: {root / 'ft-b'}: " in local.stderr and "Traceback" not in on_ray.stderr
    assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()


def _crash_on_norms(inputs, base, ctx, **params):
    """A strategy whose worker process dies (as if killed by the OOM killer) on the norm weights."""
    import torch

    if ctx.name.endswith("norm.weight"):
        os._exit(3)
    return torch.stack(list(inputs)).mean(dim=0)


def test_a_worker_that_dies_is_named_and_the_finished_shards_are_kept(ray_cluster, models_bf16, tmp_path, cli):
    from mergekit_lite.strategy import Strategy

    strategy = Strategy(name="crashing", fn=_crash_on_norms, params=(), title="crashes", summary="dies",
                        base="input", elementwise=True)
    spec = {"merge_method": "crashing", "models": [{"model": str(models_bf16 / n)} for n in ("ft-a", "ft-b")],
            "dtype": "bfloat16"}
    out = tmp_path / "merged"
    with pytest.raises(Exception) as failure:
        run_merge(spec, out, max_shard_size=SHARD, progress=False, executor="ray", validate=False,
                  strategies=[strategy])
    from mergekit_lite.errors import MergeError
    from mergekit_lite.output.journal import JOURNAL

    error = failure.value
    assert type(error) is MergeError and error.exit_code == 1, repr(error)
    assert error.where == "--executor ray"
    assert error.what.startswith("the Ray task computing model-000") and "-of-00015.safetensors failed: " in error.what
    assert "died" in error.what.lower() or "crash" in error.what.lower(), error.what
    assert error.hint.endswith("run the same command with --resume to keep the shards that finished")
    assert not out.exists()
    journal = (Path(f"{out}.partial") / JOURNAL).read_text().splitlines()
    failed = error.what.split("computing ")[1].split(" failed")[0]
    assert failed not in "".join(journal[1:])     # the crashed shard is not recorded as finished
