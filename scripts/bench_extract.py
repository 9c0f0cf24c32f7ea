"""Benchmark: LoRA extraction, `merge extract` vs mergekit-extract-lora 0.1.5, side by side.

Usage: python scripts/bench_extract.py [--size tiny|small|medium] [--rank 32] [--runs 2] [--work bench_work/extract]

Builds (once) a synthetic bf16 Llama base and a fine-tune of it (base + small random change), then alternates
the two tools (A B A B), each in a fresh process timed as a whole (wall seconds, CPU seconds, peak RSS from the
kernel's ru_maxrss of the child), with the same options (--max-rank R; embeddings and norms saved whole, as
both do by default). It prints, per module kind, the relative Frobenius error ||FT - BASE - B A|| / ||FT - BASE||
of both adapters, so the speed is compared at equal (or better) accuracy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mergekit_lite.testing.synthetic import BENCH_1B, LlamaShape, parameter_count, write_model  # noqa: E402

SIZES = {"medium": BENCH_1B,
         "small": LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),
         "tiny": LlamaShape(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=4096)}


def timed(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GiB) of one child process (from wait4)."""
    env = {**os.environ, "PYTHONPATH": REPO, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(f"{command[:4]} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def errors(adapter: str, ft: str, base: str) -> dict[str, float]:
    """Median relative error of base + B A against FT, per module kind (q_proj, down_proj, ...)."""
    import torch
    from safetensors import safe_open

    from mergekit_lite.sources.opener import open_checkpoint

    found: dict[str, list[float]] = {}
    fine, original = open_checkpoint(ft), open_checkpoint(base)
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta = fine.read(module + ".weight").float() - original.read(module + ".weight").float()
            approx = f.get_tensor(key.replace("lora_A", "lora_B")).float() @ f.get_tensor(key).float()
            error = (torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta)).item()
            found.setdefault(module.rpartition(".")[2], []).append(error)
    return {kind: statistics.median(values) for kind, values in sorted(found.items())}


def prepare(work: str, size: str) -> tuple[str, str, LlamaShape]:
    import torch

    shape = SIZES[size]
    base, ft = os.path.join(work, f"base-{size}"), os.path.join(work, f"ft-{size}")
    for folder, delta in ((base, None), (ft, 1)):
        if not os.path.exists(os.path.join(folder, "config.json")):
            print(f"writing {folder} ({parameter_count(shape) / 1e6:.0f}M parameters, bf16) ...")
            write_model(folder, shape, dtype=torch.bfloat16, seed=0, delta_seed=delta, max_shard_size=1_000_000_000)
    return os.path.abspath(base), os.path.abspath(ft), shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", default=os.path.join("bench_work", "extract"))
    args = parser.parse_args()
    base, ft, shape = prepare(args.work, args.size)
    outs = {"ours": os.path.abspath(os.path.join(args.work, "out-ours")),
            "mergekit": os.path.abspath(os.path.join(args.work, "out-mergekit"))}
    common = ["--model", ft, "--base-model", base, "--max-rank", str(args.rank)]
    tools = {"ours": [sys.executable, "-m", "mergekit_lite", "extract", *common, "-q", "-o", outs["ours"]],
             "mergekit": [os.path.join(os.path.dirname(sys.executable), "mergekit-extract-lora"), *common,
                          "--out-path", outs["mergekit"]]}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
    for run in range(args.runs):
        for name, command in tools.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            wall, cpu, peak = timed(command)
            results[name].append((wall, cpu, peak))
            print(f"  run {run + 1}: {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.2f} GiB")
    med = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                  max(r[2] for r in runs)) for name, runs in results.items()}
    print(f"\n**LoRA extraction, {args.size}** ({parameter_count(shape) / 1e6:.0f}M parameters bf16, "
          f"{shape.layers} layers, "
          f"rank {args.rank}; medians of {args.runs}, alternated, warm page cache, load {os.getloadavg()[0]:.1f})\n")
    print("| tool | wall s | CPU s | peak RSS GiB |")
    print("| --- | --- | --- | --- |")
    for name, (wall, cpu, peak) in med.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {peak:.2f} |")
    (w0, c0, p0), (w1, c1, p1) = med["ours"], med["mergekit"]
    print(f"| ours / mergekit | {w0 / w1:.2f}x | {c0 / c1:.2f}x | {p0 / p1:.2f}x |")
    ours_err, theirs_err = errors(outs["ours"], ft, base), errors(outs["mergekit"], ft, base)
    print("\n| module | relative error, ours | mergekit |")
    print("| --- | --- | --- |")
    for kind in ours_err:
        print(f"| {kind} | {ours_err[kind]:.6f} | {theirs_err.get(kind, float('nan')):.6f} |")


if __name__ == "__main__":
    main()
