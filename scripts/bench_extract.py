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
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.join(REPO, "scripts"))
from bench_fold import timed  # noqa: E402

from mergekit_lite.testing.synthetic import BENCH_1B, LlamaShape, parameter_count, write_model  # noqa: E402

SIZES = {"medium": BENCH_1B,
         "small": LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),
         "tiny": LlamaShape(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=4096)}


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
    variants = {"ours": [], "ours --no-validate": ["--no-validate"],
                "ours --svd randomized --no-validate": ["--svd", "randomized", "--no-validate"]}
    outs = {name: os.path.abspath(os.path.join(args.work, "out-" + name.replace(" ", "").replace("--", "-")))
            for name in [*variants, "mergekit"]}
    common = ["--model", ft, "--base-model", base, "--max-rank", str(args.rank)]
    tools = {name: [sys.executable, "-m", "mergekit_lite", "extract", *common, *extra, "-q", "-o", outs[name]]
             for name, extra in variants.items()}
    tools["mergekit"] = [os.path.join(os.path.dirname(sys.executable), "mergekit-extract-lora"), *common,
                         "--out-path", outs["mergekit"]]
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
    w1, c1, p1 = med["mergekit"]
    for name in variants:
        w0, c0, p0 = med[name]
        print(f"| {name} / mergekit | {w0 / w1:.2f}x | {c0 / c1:.2f}x | {p0 / p1:.2f}x |")
    found = {name: errors(outs[name], ft, base) for name in ("ours", "ours --svd randomized --no-validate",
                                                            "mergekit")}
    print("\n| module | relative error, ours (default) | ours, --svd randomized | mergekit |")
    print("| --- | --- | --- | --- |")
    for kind in found["ours"]:
        print("| " + " | ".join([kind, *(f"{errs.get(kind, float('nan')):.6f}" for errs in found.values())]) + " |")


if __name__ == "__main__":
    main()
