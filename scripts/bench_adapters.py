"""Benchmark: combining LoRA adapters into one, mergekit_lite vs peft's add_weighted_adapter, side by side.

Usage: python scripts/bench_adapters.py [--size medium|small] [--methods cat,svd] [--runs 1] [--work bench_work/adapters]

Builds (once) a synthetic bf16 Llama base (the 1B shape of scripts/bench_fold.py, or a small one) and two
rank-16 adapters on all 7 projections of every layer, then for each method runs both tools in a fresh
process each (A B A B ...), timed as a whole (wall and CPU seconds, peak RSS of that run alone), and
compares the new adapters' per-module deltas B @ A (max relative difference).
Peak RSS: a child's ru_maxrss (wait4) starts at the RSS of the process that forked it (Linux keeps the old
address space's high-water mark across exec), so a run forked from this script, which may hold torch and the
models it built, would report at least this script's size. Each run is therefore forked by a small launcher
(a bare Python, ~10 MiB) that reports its child's wait4 usage: the peak of that run alone.
peft needs the model to hold adapters: AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16),
PeftModel.from_pretrained(model, a1), load_adapter(a2), add_weighted_adapter(...), save_pretrained(out,
selected_adapters=["new"]). mergekit_lite reads the two adapter files only: merge adapters a1 a2 -o out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from bench_fold import SIZES, timed  # noqa: E402

from mergekit_lite.testing.adapters import AdapterShape, write_adapter  # noqa: E402
from mergekit_lite.testing.synthetic import parameter_count, write_model  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DENSITY = {"ties": 0.5, "ties_svd": 0.5, "magnitude_prune": 0.5, "magnitude_prune_svd": 0.5, "dare_linear": 0.5,
           "dare_ties": 0.5, "dare_linear_svd": 0.5, "dare_ties_svd": 0.5}
PEFT = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, a1, a2, out, method, density = sys.argv[1:7]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, a1, adapter_name="a1")
model.load_adapter(a2, adapter_name="a2")
kwargs = {"density": float(density)} if density != "-" else {}
model.add_weighted_adapter(["a1", "a2"], [0.6, 0.4], "new", combination_type=method, **kwargs)
model.save_pretrained(out, selected_adapters=["new"])
"""
def deltas(folder: str) -> dict:

    from safetensors.torch import load_file

    config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    return {k: scaling * (tensors[k.replace("lora_A", "lora_B")].float() @ t.float())
            for k, t in tensors.items() if "lora_A" in k}


def compare(ours: str, theirs: str) -> float:
    mine, peft = deltas(ours), deltas(theirs)
    assert mine.keys() == peft.keys(), "different modules"
    return max(((mine[k] - peft[k]).abs().max() / peft[k].abs().max().clamp(min=1e-30)).item() for k in peft)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="medium")
    parser.add_argument("--methods", default="cat,svd")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which a peft run is stopped")
    parser.add_argument("--work", default=os.path.join("bench_work", "adapters"))
    args = parser.parse_args()
    shape = SIZES[args.size]
    base = os.path.join(args.work, f"base-{args.size}")
    if not os.path.exists(os.path.join(base, "config.json")):
        import torch

        print(f"writing a {parameter_count(shape) / 1e9:.2f}B-parameter bf16 base to {base} ...")
        write_model(base, shape, dtype=torch.bfloat16, max_shard_size=1_000_000_000)
    adapters = [os.path.join(args.work, f"adapter{i}-{args.size}") for i in (1, 2)]
    for i, folder in enumerate(adapters):
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            write_adapter(folder, shape, AdapterShape(ALL, r=16, lora_alpha=32), seed=i + 1, base_model=base)
    print(f"base {parameter_count(shape) / 1e9:.2f}B bf16; two rank-16 adapters on all 7 projections of "
          f"{shape.layers} layers")
    rows = []
    for method in args.methods.split(","):
        density = DENSITY.get(method)
        ours = [sys.executable, "-m", "mergekit_lite", "adapters", *adapters, "--method", method, "--weights",
                "0.6,0.4", "--quiet", "--overwrite", *(["--density", str(density)] if density else [])]
        tools = {
            "mergekit_lite": lambda out: [*ours, "-o", out],
            "mergekit_lite --no-validate": lambda out: [*ours, "--no-validate", "-o", out],
            "peft": lambda out: [sys.executable, "-c", PEFT, base, *adapters, out, method, str(density or "-")],
        }
        results: dict[str, list] = {name: [] for name in tools}
        for run in range(args.runs):
            for name, command in tools.items():
                out = os.path.join(args.work, f"out-{name.split()[0]}-{method}")
                shutil.rmtree(out, ignore_errors=True)
                measured = timed(command(out), args.timeout if name == "peft" else None)
                if measured is None:
                    print(f"  {method} run {run + 1}: {name}: did not finish in {args.timeout:.0f} s, stopped")
                    continue
                results[name].append(measured)
                wall, cpu, peak = measured
                print(f"  {method} run {run + 1}: {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.2f} GiB")
        medians = {name: [statistics.median(r[i] for r in runs) for i in range(2)] + [max(r[2] for r in runs)]
                   for name, runs in results.items() if runs}
        rows.append((method, medians))
    # Compared only after every timed run (the launcher keeps the runs' peaks apart from this script's size,
    # but the deltas compared here would still compete with the runs for memory and time).
    rows = [(method, medians, compare(os.path.join(args.work, f"out-mergekit_lite-{method}"),
                                      os.path.join(args.work, f"out-peft-{method}", "new"))
             if "peft" in medians else None) for method, medians in rows]
    print(f"\n| method ({args.size}) | ours wall s (default / --no-validate) | peft wall s | ours CPU s | "
          "peft CPU s | ours RSS GiB | peft RSS GiB | RSS ratio | max rel. diff of deltas |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, m, rel in rows:
        ours, fast, peft = m["mergekit_lite"], m["mergekit_lite --no-validate"], m.get("peft")
        if peft is None:
            print(f"| {method} | {ours[0]:.1f} / {fast[0]:.1f} | did not finish in {args.timeout:.0f} s | "
                  f"{ours[1]:.1f} | - | {ours[2]:.2f} | - | - | - |")
            continue
        print(f"| {method} | {ours[0]:.1f} / {fast[0]:.1f} | {peft[0]:.1f} | {ours[1]:.1f} | {peft[1]:.1f} | "
              f"{ours[2]:.2f} | {peft[2]:.2f} | {peft[2] / ours[2]:.1f}x | {rel:.1e} |")


if __name__ == "__main__":
    main()
