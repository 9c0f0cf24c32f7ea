"""Side-by-side benchmark: mergekit_lite vs mergekit 0.1.5 on the same YAML, in one run.

Builds synthetic Llama-shaped bf16 checkpoints (a base and two fine-tunes, several shards each), then runs
each method with both tools, alternating (A B A B) so both see the same machine state, with a warm page
cache. Each run is a fresh process, timed as a whole: wall time, CPU time (user + system) and peak RSS.
Also measures the I/O floor: reading every input once and writing an output-sized file with fsync.

Usage:
  python scripts/bench.py                       # 3 x ~1B, linear and task_arithmetic, 2 rounds
  python scripts/bench.py --size small --methods linear,ties --rounds 3
Prints a Markdown table (paste it into the README) with ratios ours / mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from mergekit_lite.synthetic import BENCH_1B, LlamaShape, parameter_count, write_model

SIZES = {
    "tiny": LlamaShape(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=4096),
    "small": LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),  # ~125M
    "1b": BENCH_1B,                                                                                    # ~1B
}
SPECS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {w}/base\n    parameters: {{weight: 0.5}}\n"
              "  - model: {w}/ft-a\n    parameters: {{weight: 0.3}}\n  - model: {w}/ft-b\n"
              "    parameters: {{weight: 0.2}}\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {w}/base\nmodels:\n  - model: {w}/ft-a\n"
                       "    parameters: {{weight: 0.7}}\n  - model: {w}/ft-b\n    parameters: {{weight: 0.5}}\n"
                       "dtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {w}/base\nmodels:\n  - model: {w}/ft-a\n"
            "    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {w}/ft-b\n"
            "    parameters: {{weight: 0.5, density: 0.5}}\nparameters: {{normalize: true}}\ndtype: bfloat16\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {w}/base\nmodels:\n  - model: {w}/ft-a\n"
                 "    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {w}/ft-b\n"
                 "    parameters: {{weight: 0.5, density: 0.5}}\nparameters: {{normalize: true}}\ndtype: bfloat16\n",
    "slerp": "merge_method: slerp\nbase_model: {w}/base\nslices:\n  - sources:\n      - model: {w}/base\n"
             "        layer_range: [0, {layers}]\n      - model: {w}/ft-a\n        layer_range: [0, {layers}]\n"
             "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
             "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
    # The same slerp with `models:` (whole models; no layer slices needed).
    "slerp_models": "merge_method: slerp\nbase_model: {w}/base\nmodels:\n  - model: {w}/base\n  - model: {w}/ft-a\n"
                    "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                    "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
}
# Runs a command and reports its wall time, CPU time and peak RSS (the child's, from getrusage).
TIMER = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
         "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
         "w = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(json.dumps({'rc': p.returncode, 'wall': w, 'cpu': r.ru_utime + r.ru_stime, "
         "'rss_gib': r.ru_maxrss / 2**20, 'err': p.stderr.decode()[-2000:]}))")


def build_models(work: str, shape: LlamaShape) -> None:
    marker = os.path.join(work, "models.json")
    wanted = json.dumps(shape.__dict__, sort_keys=True)
    if os.path.exists(marker) and open(marker).read() == wanted:
        return
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shard = 500_000_000 if parameter_count(shape) > 200e6 else 100_000_000
    for name, delta in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        started = time.perf_counter()
        write_model(os.path.join(work, name), shape, dtype=torch.bfloat16, seed=0, delta_seed=delta,
                    delta_scale=0.002, max_shard_size=shard)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    with open(marker, "w") as f:
        f.write(wanted)


def timed(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", TIMER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result['err']}")
    return result


def io_floor(work: str, out_bytes: int) -> float:
    """Seconds to read every input file once (warm cache) and write an output-sized file with fsync."""
    started = time.perf_counter()
    buf = bytearray(64 << 20)
    for name in ("base", "ft-a", "ft-b"):
        folder = os.path.join(work, name)
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                with open(os.path.join(folder, f), "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    target = os.path.join(work, "floor.bin")
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(len(buf), left)])
        os.fsync(fh.fileno())
    os.remove(target)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--methods", default="linear,task_arithmetic")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="bench_work")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--ours-args", default="", help="extra arguments for `merge run`")
    args = parser.parse_args()
    shape = SIZES[args.size]
    work = os.path.abspath(os.path.join(args.work, args.size))
    build_models(work, shape)
    out_bytes = parameter_count(shape) * 2
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) or shutil.which("mergekit-yaml")
    merge = [sys.executable, "-m", "mergekit_lite", "run"]
    rows = []
    floors = [io_floor(work, out_bytes) for _ in range(2)]
    for method in args.methods.split(","):
        spec = os.path.join(work, f"{method}.yaml")
        with open(spec, "w") as f:
            f.write(SPECS[method].format(w=work, layers=shape.layers))
        runs: dict[str, list[dict]] = {"ours": [], "mergekit": []}
        for _ in range(args.rounds):
            out = os.path.join(work, "out")
            shutil.rmtree(out, ignore_errors=True)
            runs["ours"].append(timed([*merge, spec, "-o", out, "--quiet", *args.ours_args.split()]))
            if mergekit and not args.no_mergekit:
                shutil.rmtree(out, ignore_errors=True)
                runs["mergekit"].append(timed([mergekit, spec, out]))
            shutil.rmtree(out, ignore_errors=True)
        rows.append((method, {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "rss_gib")}
                              for k, v in runs.items() if v}))
    floor = statistics.median(floors)
    print(f"\n{args.size}: 3 inputs x {parameter_count(shape) / 1e6:.0f}M parameters, bf16, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, median of {args.rounds} alternating runs; "
          f"I/O floor (read inputs + write output with fsync): {floor:.1f} s\n")
    print("| method | ours: wall s / CPU s / peak RSS GiB | mergekit 0.1.5: wall s / CPU s / peak RSS GiB "
          "| wall ratio | RSS ratio | ours / I/O floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, result in rows:
        ours, theirs = result["ours"], result.get("mergekit")
        cells = [method, f"{ours['wall']:.1f} / {ours['cpu']:.1f} / {ours['rss_gib']:.2f}"]
        if theirs:
            cells += [f"{theirs['wall']:.1f} / {theirs['cpu']:.1f} / {theirs['rss_gib']:.2f}",
                      f"{ours['wall'] / theirs['wall']:.2f}", f"{ours['rss_gib'] / theirs['rss_gib']:.2f}"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{ours['wall'] / floor:.1f}x")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
