"""Scaling chart: wall time and peak RSS against model size and number of inputs, ours and mergekit's.

One command builds the synthetic models, runs a linear merge with both tools (scripts/bench.py, alternating,
fresh processes, warm cache), and draws docs/scaling.png (numbers in docs/scaling.json):
  - model size: ~0.12B, 0.5B, 1B and 3B parameters per model, 3 inputs;
  - inputs: 2, 3, 4, 6 and 8 models of 0.5B.
Models of each size are deleted after use (except 1b, which scripts/bench.py shares) to spare the disk: the
largest step holds 3 x 6 GB of 3B inputs plus a 6 GB output.

Usage:
  python scripts/scaling.py                 # everything (about half an hour on 2 cores)
  python scripts/scaling.py --only sizes    # measure one sweep again (the other is kept from docs/scaling.json)
  python scripts/scaling.py --plot-only     # redraw from docs/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import run_benchmark  # noqa: E402

SIZES = ("small", "0.5b", "1b", "3b")
INPUTS = (2, 3, 4, 6, 8)
SWEEP_SIZE = "0.5b"
KEEP = {"1b"}


def measure(work: str, rounds: int, only: str = "", previous: dict | None = None) -> dict:
    results: dict = {"sizes": [], "inputs": []}
    if only:
        results = {**previous, only: []}
    for inputs in INPUTS if only != "sizes" else ():
        report = run_benchmark(SWEEP_SIZE, ["linear"], rounds, work, inputs)
        results["inputs"].append(_point(report, "inputs", inputs))
        print(json.dumps(results["inputs"][-1]), flush=True)
    for size in SIZES if only != "inputs" else ():
        if size == SWEEP_SIZE and results["inputs"]:
            point = next(p for p in results["inputs"] if p["inputs"] == 3)
            results["sizes"].append({**point, "x": point["parameters"]})
        else:
            report = run_benchmark(size, ["linear"], rounds, work, 3)
            results["sizes"].append(_point(report, "parameters", report["parameters"]))
        print(json.dumps(results["sizes"][-1]), flush=True)
        if size not in KEEP:
            shutil.rmtree(os.path.join(work, size), ignore_errors=True)
    return results


def _point(report: dict, axis: str, x: float) -> dict:
    linear = report["methods"]["linear"]
    floor = report["floor"]
    return {"x": x, axis: x, "parameters": report["parameters"], "inputs": report["inputs"],
            "ours": linear["ours --no-validate"], "mergekit": linear.get("mergekit"),
            "rss_bound_gib": linear["rss_bound_gib"],
            "floor_s": floor["read"] + min(floor["write_buffered"], floor["write_direct"]),
            "load": [report["load_before"], report["load_after"]]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    panels = [("sizes", "parameters per model (billions), 3 inputs", 1e9), ("inputs", "inputs (0.5B each)", 1)]
    for column, (key, label, scale) in enumerate(panels):
        points = sorted(results[key], key=lambda p: p["x"])
        xs = [p["x"] / scale for p in points]
        for row, (metric, title) in enumerate((("wall", "wall time (s)"), ("rss_gib", "peak RSS (GiB)"))):
            ax = axes[row][column]
            ax.plot(xs, [p["ours"][metric] for p in points], "o-", label="mergekit_lite")
            if all(p["mergekit"] for p in points):
                ax.plot(xs, [p["mergekit"][metric] for p in points], "s--", label="mergekit 0.1.5")
            if metric == "wall":
                ax.plot(xs, [p["floor_s"] for p in points], ":", color="gray", label="I/O floor (read + write)")
            else:
                ax.plot(xs, [p["rss_bound_gib"] for p in points], ":", color="gray",
                        label="bound: (inputs + 2) x largest fp32 tensor + 300 MB")
            ax.set_ylim(bottom=0)
            ax.set_xlabel(label)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Linear merge of bf16 Llama-shaped models on 2 cores (fresh processes; inputs read from "
                 "the page cache where they fit)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench_work")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--only", choices=["sizes", "inputs"], help="measure one sweep; keep the other's numbers")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "scaling.json")
    if args.plot_only:
        with open(data) as f:
            results = json.load(f)
    else:
        previous = None
        if args.only:
            with open(data) as f:
                previous = json.load(f)
        results = measure(args.work, args.rounds, args.only or "", previous)
        with open(data, "w") as f:
            json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "scaling.png"))
    print(f"wrote {os.path.join(args.out, 'scaling.png')}")


if __name__ == "__main__":
    main()
