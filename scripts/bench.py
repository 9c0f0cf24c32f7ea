"""Side-by-side benchmark: mergekit_lite vs mergekit 0.1.5 on the same YAML, in one run.

Builds synthetic Llama-shaped bf16 checkpoints (a base and fine-tunes of it, several shards each), then runs
each method with both tools, alternating (A B A B) so both see the same machine state, with a warm page
cache. Each run is a fresh process, timed as a whole: wall time, CPU time (user + system) and peak RSS.
Ours runs twice per round: the default command (which validates its output) and with --no-validate (mergekit
does not check its output); `--only-no-validate` drops the first.

Also measures the I/O floor in the same run: reading every input once (warm cache) plus writing an
output-sized file, both through the page cache with fsync and with O_DIRECT; the ratio uses the faster
(stricter) of the two. And the memory bound of the issue: (inputs + 2) x the largest tensor in float32
+ 300 MB.

Usage:
  python scripts/bench.py                       # 3 x ~1B, linear and task_arithmetic, 2 rounds
  python scripts/bench.py --size small --methods linear,ties --rounds 3
  python scripts/bench.py --size 3b --rounds 1  # 3 x 3B: 18 GB of inputs (see FIXTURE_BUDGET)
  python scripts/bench.py --size bigvocab --methods linear --no-mergekit   # largest tensor 1 GiB in float32
  python scripts/bench.py --size 3b --methods linear --rounds 1 --cold      # page cache emptied before each run
Prints Markdown tables (paste them into the README as they are): the date and machine, then per method the
default command, --no-validate and mergekit, each with its ratio to mergekit and to the I/O floor, and the floor
itself as a row. --json FILE saves the numbers, again after each method, and each method's wall times go to
stderr as it finishes: a run that stops keeps what it measured (`--print FILE` prints its tables).

Fixtures live in --work (bench_work/, git-ignored), one folder per size; before building one, the other sizes'
folders are deleted, oldest first, until all fixtures fit in FIXTURE_BUDGET, and the run is refused when the
disk has no room for the inputs plus one output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from mergekit_lite.output.direct_io import DirectStream
from mergekit_lite.testing.synthetic import BENCH_1B, LlamaShape, parameter_count, tensor_shapes, write_model

SIZES = {
    "tiny": LlamaShape(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=4096),
    "small": LlamaShape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),  # ~125M
    "0.5b": LlamaShape(hidden=1536, intermediate=6144, layers=12, heads=24, kv_heads=8, vocab=32000),  # ~0.5B
    "1b": BENCH_1B,                                                                                    # ~1B
    "3b": LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=32000),   # ~3B
    # Largest tensor 1 GiB in float32: a 131072-token vocabulary (embeddings and lm_head, 128K x 2048).
    "bigvocab": LlamaShape(hidden=2048, intermediate=8192, layers=2, heads=32, kv_heads=8, vocab=131072),
}
FINETUNES = "abcdefg"   # ft-a ... ft-g: up to 8 inputs with the base
FIXTURE_BUDGET = 26e9   # bytes of synthetic models kept in --work (3 x 3B, 18 GB, beside 3 x 1B); --fixture-budget GB
WEIGHTS = (0.5, 0.3, 0.2)


def models_for(inputs: int) -> list[str]:
    return ["base"] + [f"ft-{c}" for c in FINETUNES[: inputs - 1]]


def spec_text(method: str, work: str, shape: LlamaShape, inputs: int) -> str:
    """The method's spec over ``inputs`` models (the base counts as one)."""
    names = models_for(inputs)
    weights = WEIGHTS if inputs == 3 else [round(1 / inputs, 4)] * inputs
    if method == "linear":
        entries = "".join(f"  - model: {work}/{n}\n    parameters: {{weight: {w}}}\n" for n, w in zip(names, weights))
        return f"merge_method: linear\nmodels:\n{entries}dtype: bfloat16\n"
    if method == "task_arithmetic":
        entries = "".join(f"  - model: {work}/{n}\n    parameters: {{weight: {w}}}\n"
                          for n, w in zip(names[1:], (0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2)))
        return f"merge_method: task_arithmetic\nbase_model: {work}/base\nmodels:\n{entries}dtype: bfloat16\n"
    if method in ("ties", "dare_ties"):
        entries = "".join(f"  - model: {work}/{n}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for n in names[1:])
        return (f"merge_method: {method}\nbase_model: {work}/base\nmodels:\n{entries}"
                "parameters: {normalize: true}\ndtype: bfloat16\n")
    if method in ("della", "breadcrumbs"):   # mergekit's own examples' settings
        params = "density: 0.5, epsilon: 0.1, lambda: 1.0" if method == "della" else "density: 0.9, gamma: 0.01"
        entries = "".join(f"  - model: {work}/{n}\n    parameters: {{weight: 0.5, {params}}}\n" for n in names[1:])
        return f"merge_method: {method}\nbase_model: {work}/base\nmodels:\n{entries}dtype: bfloat16\n"
    if method == "model_stock":
        entries = "".join(f"  - model: {work}/{n}\n" for n in names[1:])
        return f"merge_method: model_stock\nbase_model: {work}/base\nmodels:\n{entries}dtype: bfloat16\n"
    gradients = ("parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
                 "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n")
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {work}/base\nslices:\n  - sources:\n      - model: {work}/base\n"
                f"        layer_range: [0, {shape.layers}]\n      - model: {work}/ft-a\n"
                f"        layer_range: [0, {shape.layers}]\n" + gradients)
    if method == "slerp_models":   # the same slerp with `models:` (whole models; no layer slices needed)
        return (f"merge_method: slerp\nbase_model: {work}/base\nmodels:\n  - model: {work}/base\n"
                f"  - model: {work}/ft-a\n" + gradients)
    raise SystemExit(f"unknown method {method}")


def method_inputs(method: str, inputs: int) -> int:
    return 2 if method.startswith("slerp") else inputs


# Runs a command and reports its wall time, CPU time and peak RSS (the child's, from getrusage).
TIMER = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
         "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
         "w = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(json.dumps({'rc': p.returncode, 'wall': w, 'cpu': r.ru_utime + r.ru_stime, "
         "'rss_gib': r.ru_maxrss / 2**20, 'err': p.stderr.decode()[-2000:]}))")


def machine() -> str:
    """Today's date and this machine: CPU model, cores, RAM (for the line above each table)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        with open("/proc/meminfo") as f:
            ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration, ValueError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{datetime.date.today().isoformat()}, {model}, {os.cpu_count()} cores, {ram / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__}")


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def drop_caches() -> None:
    """Empty the kernel's page cache (Linux, as root), so the next reads come from the disk: a cold run."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold empties the page cache through /proc/sys/vm/drop_caches, which needs root on "
                         f"Linux: {exc}")


def make_room(work_root: str, keep: str, needed: int, output: int) -> None:
    """Delete other sizes' fixture folders in ``work_root`` (ours: they hold models.json), oldest first, until
    the fixtures fit in FIXTURE_BUDGET with ``needed`` more bytes; refuse if the disk cannot hold them plus
    one ``output``."""
    os.makedirs(work_root, exist_ok=True)
    others = [os.path.join(work_root, d) for d in os.listdir(work_root)
              if d != keep and os.path.isfile(os.path.join(work_root, d, "models.json"))]
    others.sort(key=lambda d: os.path.getmtime(os.path.join(d, "models.json")))
    kept = sum(folder_bytes(d) for d in others)
    while others and kept + needed > FIXTURE_BUDGET:
        folder = others.pop(0)
        kept -= folder_bytes(folder)
        print(f"deleting the fixtures {folder} to stay within {FIXTURE_BUDGET / 1e9:.0f} GB", file=sys.stderr)
        shutil.rmtree(folder)
    free = shutil.disk_usage(work_root).free
    if needed + output > free:
        raise SystemExit(f"{work_root}: {(needed + output) / 1e9:.1f} GB needed (inputs still to build + one output), "
                         f"{free / 1e9:.1f} GB free; free some disk or choose a smaller --size")


def build_models(work: str, shape: LlamaShape, inputs: int) -> None:
    """The base and fine-tunes in ``work`` (kept between runs; rebuilt when the shape changes)."""
    marker = os.path.join(work, "models.json")
    wanted = json.dumps(shape.__dict__, sort_keys=True)
    current = os.path.exists(marker) and open(marker).read() == wanted
    model_bytes = parameter_count(shape) * 2
    missing = sum(not (current and os.path.exists(os.path.join(work, name, "config.json")))
                  for name in models_for(inputs))
    make_room(os.path.dirname(work), os.path.basename(work), missing * model_bytes, model_bytes)
    if not current:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        with open(marker, "w") as f:
            f.write(wanted)
    shard = 500_000_000 if parameter_count(shape) > 200e6 else 100_000_000
    for i, name in enumerate(models_for(inputs)):
        folder = os.path.join(work, name)
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        started = time.perf_counter()
        write_model(folder, shape, dtype=torch.bfloat16, seed=0, delta_seed=i or None, delta_scale=0.002,
                    max_shard_size=shard)
        print(f"built {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def timed(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", TIMER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result['err']}")
    return result


def io_floor(work: str, names: list[str], out_bytes: int, cold: bool = False) -> dict[str, float]:
    """Seconds to read every input file once (warm cache; ``cold``: from the disk, the page cache emptied
    first), and to write an output-sized file: through the page cache with fsync, and with O_DIRECT (as
    mergekit_lite writes shards)."""
    buf = bytearray(64 << 20)
    if cold:
        drop_caches()
    started = time.perf_counter()
    for name in names:
        folder = os.path.join(work, name)
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                with open(os.path.join(folder, f), "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    read = time.perf_counter() - started
    target = os.path.join(work, "floor.bin")
    started = time.perf_counter()
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(len(buf), left)])
        os.fsync(fh.fileno())
    buffered = time.perf_counter() - started
    os.remove(target)
    started = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stream = DirectStream.open(target)
    if stream is not None:
        left = out_bytes
        while left > 0:
            step = min(len(buf), left)
            stream.append(memoryview(buf)[:step])
            left -= step
        stream.finish()
        stream.close()
        os.ftruncate(fd, out_bytes)
    os.fsync(fd)
    os.close(fd)
    direct = time.perf_counter() - started if stream is not None else math.inf
    os.remove(target)
    return {"read": read, "write_buffered": buffered, "write_direct": direct}


def rss_bound_gib(shape: LlamaShape, inputs: int) -> float:
    """The issue's memory bound: (inputs + 2) x the largest tensor in float32 + 300 MB."""
    largest = max(math.prod(dims) for _, dims in tensor_shapes(shape)) * 4
    return ((inputs + 2) * largest + 300e6) / 2**30


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_benchmark(size: str, methods: list[str], rounds: int, work_root: str, inputs: int = 3,
                  mergekit: bool = True, ours_args: tuple[str, ...] = (), validate: bool = False,
                  cold: bool = False, measured: Optional[Callable[[dict, str], None]] = None) -> dict:
    """Build the models, measure the floor, run every method with each tool alternating; medians.
    ``validate``: also time our default command (which validates the output) beside --no-validate. ``cold``:
    the page cache is emptied before each run and before the floor's reads (drop_caches). ``measured(report,
    method)``: called after each method with the report so far (a 3B run of every method takes most of an hour,
    and a command that fails stops it)."""
    shape = SIZES[size]
    work = os.path.abspath(os.path.join(work_root, size))
    build_models(work, shape, max(inputs, max(method_inputs(m, inputs) for m in methods)))
    mergekit_cmd = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) or shutil.which("mergekit-yaml")
    merge = [sys.executable, "-m", "mergekit_lite", "run"]
    report = {"size": size, "parameters": parameter_count(shape), "inputs": inputs, "rounds": rounds,
              "machine": machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "load_before": load_average(), "cold": cold, "methods": {}}
    out_bytes = parameter_count(shape) * 2
    # the first pass warms the page cache (fresh models may be partly on disk only) and is not counted
    floors = [io_floor(work, models_for(inputs), out_bytes, cold) for _ in range(3)][1:]
    report["floor"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    tools = {}
    if validate:
        tools["ours"] = [*merge, *ours_args]
    tools["ours --no-validate"] = [*merge, "--no-validate", *ours_args]
    if mergekit and mergekit_cmd:
        tools["mergekit"] = [mergekit_cmd]
    out = os.path.join(work, "out")
    for method in methods:
        spec = os.path.join(work, f"{method}-{inputs}.yaml")
        with open(spec, "w") as f:
            f.write(spec_text(method, work, shape, method_inputs(method, inputs)))
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for _ in range(rounds):
            for tool, cmd in tools.items():
                shutil.rmtree(out, ignore_errors=True)
                extra = ["-o", out, "--quiet"] if tool.startswith("ours") else [out]
                if cold:
                    drop_caches()
                runs[tool].append(timed([*cmd, spec, *extra]))
                shutil.rmtree(out, ignore_errors=True)
        report["methods"][method] = {tool: {m: statistics.median(r[m] for r in rs) for m in ("wall", "cpu", "rss_gib")}
                                     for tool, rs in runs.items()}
        report["methods"][method]["rss_bound_gib"] = rss_bound_gib(shape, method_inputs(method, inputs))
        report["load_after"] = load_average()
        if measured is not None:
            measured(report, method)
    return report


def floor_seconds(floor: dict[str, float]) -> float:
    """Read every input once plus write the output, the faster of the two ways to write."""
    return floor["read"] + min(floor["write_buffered"], floor["write_direct"])


def ratio(value: float, reference: Optional[float]) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


TOOL_NAMES = {"ours": "mergekit_lite (default: validates)", "ours --no-validate": "mergekit_lite --no-validate",
              "mergekit": "mergekit 0.1.5"}


def print_table(report: dict) -> None:
    floor = report["floor"]
    strict = floor_seconds(floor)
    print(f"\n**{report['size']}: {report['inputs']} inputs x {report['parameters'] / 1e6:.0f}M parameters, bf16** "
          f"({report.get('machine', '')}; medians of {report['rounds']} alternating runs, each a fresh process, "
          f"{'cold: page cache emptied (drop_caches) before each run' if report.get('cold') else 'warm page cache'}; "
          f"load average {report['load_before']} before, {report['load_after']} after). "
          f"I/O floor measured in the same run: read the inputs {floor['read']:.1f} s + write the output "
          f"{min(floor['write_buffered'], floor['write_direct']):.1f} s (the faster of page cache + fsync, "
          f"{floor['write_buffered']:.1f} s, and O_DIRECT, {floor['write_direct']:.1f} s).\n")
    print("| method | command | wall s | CPU s | peak RSS GiB | / mergekit (wall) | / I/O floor (wall) "
          "| RSS bound GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(table_row(["-", "I/O floor: read inputs + write output", f"{strict:.1f}", "", "", "", "1.00x", ""]))
    for method, result in report["methods"].items():
        theirs = result.get("mergekit")
        for tool, name in TOOL_NAMES.items():
            if tool not in result:
                continue
            r = result[tool]
            print(table_row([method, name, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['rss_gib']:.2f}",
                             ratio(r["wall"], theirs and theirs["wall"]), ratio(r["wall"], strict),
                             f"{result['rss_bound_gib']:.2f}" if tool.startswith("ours") else ""]))


def main() -> None:
    global FIXTURE_BUDGET
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--inputs", type=int, default=3, help="models merged, the base included (2 to 8)")
    parser.add_argument("--methods", default="linear,task_arithmetic")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="bench_work")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--only-no-validate", action="store_true",
                        help="time ours with --no-validate only (not also the default command, which validates)")
    parser.add_argument("--ours-args", default="", help="extra arguments for `merge run`")
    parser.add_argument("--json", help="also write the numbers to this file (again after each method)")
    parser.add_argument("--print", metavar="JSON", help="only print the tables of numbers saved with --json")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each run (Linux, root: /proc/sys/vm/drop_caches)")
    parser.add_argument("--fixture-budget", type=float, default=FIXTURE_BUDGET / 1e9,
                        help="GB of synthetic models kept in --work before other sizes' are deleted")
    args = parser.parse_args()
    if args.print:
        with open(args.print) as f:
            print_table(json.load(f))
        return
    FIXTURE_BUDGET = args.fixture_budget * 1e9
    for method in args.methods.split(","):   # an unknown method stops the run now, not after the others ran
        spec_text(method, args.work, SIZES[args.size], args.inputs)

    def measured(report: dict, method: str) -> None:
        walls = ", ".join(f"{TOOL_NAMES[tool]} {r['wall']:.1f} s" for tool, r in report["methods"][method].items()
                          if tool in TOOL_NAMES)
        print(f"{method}: {walls}", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    report = run_benchmark(args.size, args.methods.split(","), args.rounds, args.work, args.inputs,
                           not args.no_mergekit, tuple(args.ours_args.split()), not args.only_no_validate,
                           args.cold, measured)
    print_table(report)


if __name__ == "__main__":
    main()
