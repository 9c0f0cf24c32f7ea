"""Benchmark: folding a LoRA adapter into a sharded base, mergekit_lite vs peft's merge_and_unload, side by side.

Usage: python scripts/bench_fold.py [--size medium|small] [--runs 2] [--work bench_work/fold]

Builds (once) a synthetic bf16 Llama base in 1 GB shards and a rank-16 rsLoRA adapter on every projection,
measures the I/O floor (read the base and the adapter once, write an output-sized file; scripts/bench.py's
io_floor), then alternates the tools (A B C A B C), each in a fresh process timed as a whole (wall seconds, CPU
seconds, peak RSS from the kernel's ru_maxrss of the child), and checks that both wrote the same tensors bit for
bit. mergekit_lite: `merge fold base adapter -o out` (the default, which validates the output) and the same with
--no-validate. peft: AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16), PeftModel.from_pretrained(model,
adapter), merge_and_unload(), save_pretrained(out). Prints a Markdown table the README can take as it is, with
the date and machine, each row's ratio to peft and to the floor, and the memory bound of the merge.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import floor_seconds, io_floor, load_average, machine, ratio, rss_bound_gib, table_row  # noqa: E402

from mergekit_lite.testing.adapters import DEMO_ADAPTERS, write_adapter  # noqa: E402
from mergekit_lite.testing.synthetic import BENCH_1B, LlamaShape, parameter_count, write_model  # noqa: E402

SIZES = {"medium": BENCH_1B, "small": LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4,
                                                  vocab=32000)}
PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


# Forks the command from a small process and writes its child's wall s, CPU s and peak RSS (KiB) to argv[1]. A
# child's ru_maxrss (wait4) starts at the RSS of the process that forked it (Linux keeps the old address space's
# high-water mark across exec), so a run forked from a benchmark script holding torch and tensors would report at
# least that script's size; forked from this bare Python (~10 MiB), it reports the run alone.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([time.perf_counter() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss], f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(command: list[str], timeout: Optional[float] = None) -> Optional[tuple[float, float, float]]:
    """Run a command in a child process: wall seconds, CPU seconds and peak RSS in GiB of that child alone
    (LAUNCHER). CPU seconds matter on a shared machine, where wall time depends on the neighbours. After
    ``timeout`` seconds the run is killed (with its children) and None returned."""
    env = {**os.environ, "PYTHONPATH": REPO, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        report, log = os.path.join(scratch, "usage.json"), os.path.join(scratch, "log")
        with open(log, "wb") as out:
            done = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, report, *command], env=env, stdout=out,
                                    stderr=out, start_new_session=True)
            try:
                done.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(done.pid, signal.SIGKILL)
                done.wait()
                return None
        if done.returncode:
            with open(log, "rb") as f:
                raise SystemExit(f"{command[:4]} failed:\n{f.read().decode(errors='replace')[-2000:]}")
        with open(report) as f:
            wall, cpu, peak_kib = json.load(f)
    return wall, cpu, peak_kib / 2**20


def same_tensors(a: str, b: str) -> bool:
    from safetensors import safe_open

    def tensors(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)

    import torch

    theirs = dict(tensors(b))
    ours = 0
    for key, tensor in tensors(a):
        ours += 1
        if key not in theirs or not torch.equal(tensor, theirs.pop(key)):
            print(f"  differs: {key}")
            return False
    return not theirs and ours > 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="medium")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", default=os.path.join("bench_work", "fold"))
    parser.add_argument("--only-no-validate", action="store_true",
                        help="time mergekit_lite with --no-validate only (not also the default command)")
    args = parser.parse_args()
    shape = SIZES[args.size]
    base = os.path.join(args.work, f"base-{args.size}")
    adapter = os.path.join(args.work, f"adapter-{args.size}")
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"writing a {parameter_count(shape) / 1e9:.2f}B-parameter bf16 base to {base} ...")
        import torch

        write_model(base, shape, dtype=torch.bfloat16, max_shard_size=1_000_000_000)
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        write_adapter(adapter, shape, DEMO_ADAPTERS["code"], base_model=base)
    shards = sum(name.endswith(".safetensors") for name in os.listdir(base))
    largest = 2 * max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)
    description = (f"a synthetic {parameter_count(shape) / 1e9:.2f}B-parameter bf16 Llama base in {shards} shards "
                   f"(largest tensor {largest / 2**20:.0f} MiB), a rank-16 rsLoRA adapter on all 7 projections of "
                   f"its {shape.layers} layers")
    print(description)
    load_before = load_average()
    # the first pass warms the page cache and is not counted
    floors = [io_floor(args.work, [os.path.basename(base), os.path.basename(adapter)], parameter_count(shape) * 2)
              for _ in range(3)][1:]
    floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    fold = [sys.executable, "-m", "mergekit_lite", "fold", base, adapter, "--quiet", "--overwrite", "-o"]
    tools = {"`merge fold base adapter -o out` (default: validates)": fold,
             "`merge fold base adapter -o out --no-validate`": [*fold[:-1], "--no-validate", "-o"],
             "peft: `from_pretrained` + `merge_and_unload()` + `save_pretrained`":
                 [sys.executable, "-c", PEFT, base, adapter]}
    if args.only_no_validate:
        del tools[next(iter(tools))]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
    for run in range(args.runs):
        for name, command in tools.items():
            out = os.path.join(args.work, "out-peft" if name.startswith("peft") else "out-mergekit_lite")
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu, peak = timed([*command, out])
            results[name].append((wall, cpu, peak))
            print(f"  run {run + 1}: {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.2f} GiB")
    exact = same_tensors(os.path.join(args.work, "out-mergekit_lite"), os.path.join(args.work, "out-peft"))
    for out in ("out-mergekit_lite", "out-peft"):   # 2 GB each at medium: keep only the inputs
        shutil.rmtree(os.path.join(args.work, out), ignore_errors=True)
    medians = {name: tuple(statistics.median(r[i] for r in runs) for i in range(2)) + (max(r[2] for r in runs),)
               for name, runs in results.items()}
    peft_wall = next(wall for name, (wall, _, _) in medians.items() if name.startswith("peft"))
    strict = floor_seconds(floor)
    print(f"\n**Folding a LoRA adapter, {args.size}** ({machine()}): {description}; each command a fresh process, "
          f"alternated, medians of {args.runs}; warm page cache; load average {load_before} before, "
          f"{load_average()} after. I/O floor measured in the same run: read the base and adapter "
          f"{floor['read']:.1f} s + write the output {min(floor['write_buffered'], floor['write_direct']):.1f} s. "
          f"The merge's memory bound: 3 x the largest tensor in float32 + 300 MB = "
          f"{rss_bound_gib(shape, 1):.2f} GiB.\n")
    print("| command | wall s | CPU s | peak RSS GiB | / peft (wall) | / I/O floor (wall) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(table_row(["I/O floor: read base + adapter, write the output", f"{strict:.1f}", "", "", "", "1.00x"]))
    for name, (wall, cpu, peak) in medians.items():
        print(table_row([name, f"{wall:.1f}", f"{cpu:.1f}", f"{peak:.2f}", ratio(wall, peft_wall),
                         ratio(wall, strict)]))
    print(f"\nThe fold and peft wrote the same tensors, bit for bit: {exact}")


if __name__ == "__main__":
    main()
