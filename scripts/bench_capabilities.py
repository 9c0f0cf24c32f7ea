"""Benchmark the newer capabilities of mergekit_lite against mergekit 0.1.5, side by side, on the same files.

Usage:
  python scripts/bench_capabilities.py                        # 1b: 3 x ~1B bf16 inputs, every capability, 1 round
  python scripts/bench_capabilities.py --size tiny            # seconds: to check the script itself
  python scripts/bench_capabilities.py --size small --rounds 3 --only union,moe --gate-modes cheap_embed,random

Capabilities (one Markdown table each):
  union   `tokenizer: {source: union}` over a linear merge of three models whose tokenizers differ (two of them
          add different chat tokens): `merge run SPEC OUT` against `mergekit-yaml SPEC OUT`.
  multi   a mergekit-multi file of two stages (a linear "soup" of two fine-tunes, then a slerp of the base with
          that soup): `merge run FILE OUT` (stages in OUT.stages/) against
          `mergekit-multi FILE --intermediate-dir DIR --out-path OUT`.
  moe     a Mixtral MoE with the base's attention and the two fine-tunes as experts, per --gate-modes (random,
          cheap_embed, hidden: hidden runs the base model over the prompts on the CPU, in bfloat16 as mergekit):
          `merge moe CONFIG OUT` against `mergekit-moe CONFIG OUT --random-seed 0` (the seed of
          our --seed 0, so random routers match).

Each table has three rows: our default command (which validates its output), ours with --no-validate, and
mergekit; wall seconds, CPU seconds (user + system) and peak RSS of the child process alone (from wait4, as
scripts/bench_fold.py), each command a fresh process, alternated (A B C A B C) over --rounds, medians; the wall
ratio to mergekit; and the memory bound (inputs + 2) x the largest tensor in float32 + 300 MB (inputs: the
models one merge reads; for multi the largest stage) with whether each run stayed within it.

Fixtures: the base and fine-tunes of scripts/bench.py (bench_work/<size>/base, ft-a, ft-b: shared with it and
built only when missing), plus bench_work/<size>/capabilities/tok-*: the same weights (hard links) with
tokenizers that differ. Outputs go to bench_work/<size>/capabilities/out-* and are deleted before and after each
run. Progress is printed on stderr, the tables on stdout; --json FILE saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")

from bench import SIZES, build_models, load_average, machine, ratio, rss_bound_gib, table_row  # noqa: E402
from bench_fold import timed  # noqa: E402

from mergekit_lite.testing.synthetic import LlamaShape, parameter_count, write_tokenizer  # noqa: E402

CAPABILITIES = ("union", "multi", "moe")
GATE_MODES = ("random", "cheap_embed", "hidden")
# tok-base: the plain vocabulary; tok-a and tok-b add two tokens each (different ones) in the last rows
ADDED = {"tok-base": [], "tok-a": ["<|im_start|>", "<|im_end|>"], "tok-b": ["<tool_call>", "</tool_call>"]}
WEIGHTS_OF = {"tok-base": "base", "tok-a": "ft-a", "tok-b": "ft-b"}
SPARE_ROWS = 4   # embedding rows no tokenizer of tok-base names: room for the union's 2 + 2 added tokens


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tokenizer_models(work: str, shape: LlamaShape) -> str:
    """tok-base, tok-a, tok-b in work/capabilities: the weights of base, ft-a, ft-b (hard links, so no copy)
    with a word-level tokenizer naming vocab - 4 words, tok-a and tok-b adding two chat tokens each."""
    root = os.path.join(work, "capabilities")
    for name, added in ADDED.items():
        folder = os.path.join(root, name)
        if os.path.exists(os.path.join(folder, "bench_fixture.txt")):   # written last: the folder is complete
            continue
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        source = os.path.join(work, WEIGHTS_OF[name])
        for f in os.listdir(source):
            if f.endswith((".safetensors", ".json")) and not f.startswith("tokenizer"):
                try:
                    os.link(os.path.join(source, f), os.path.join(folder, f))
                except OSError:   # a file system without hard links
                    shutil.copy2(os.path.join(source, f), os.path.join(folder, f))
        write_tokenizer(folder, shape.vocab - SPARE_ROWS)
        with open(os.path.join(folder, "tokenizer.json")) as fh:
            tokenizer = json.load(fh)
        first = shape.vocab - SPARE_ROWS
        tokenizer["added_tokens"] += [{"id": first + i, "content": t, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True}
                                      for i, t in enumerate(added)]
        with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
            json.dump(tokenizer, fh, indent=2)
        with open(os.path.join(folder, "bench_fixture.txt"), "w") as fh:
            fh.write(f"weights of {source}, tokenizer of {first} words + {added}\n")
        say(f"wrote {folder} (tokenizer: {first} words + {added or 'no added tokens'})")
    return root


def union_spec(root: str) -> str:
    entries = "".join(f"  - model: {root}/{name}\n    parameters: {{weight: {w}}}\n"
                      for name, w in zip(ADDED, (0.5, 0.3, 0.2)))
    return (f"merge_method: linear\nbase_model: {root}/tok-base\nmodels:\n{entries}"
            "tokenizer:\n  source: union\ndtype: bfloat16\n")


def multi_spec(work: str) -> str:
    return (f"name: soup\nmerge_method: linear\nmodels:\n  - model: {work}/ft-a\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {work}/ft-b\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n---\n"
            f"merge_method: slerp\nbase_model: {work}/base\nmodels:\n  - model: {work}/base\n  - model: soup\n"
            "parameters:\n  t: [0.2, 0.7]\ndtype: bfloat16\n")


def moe_spec(work: str, gate_mode: str) -> str:
    prompts = {"ft-a": ["w12 w40 w7 w3", "w100 w101"], "ft-b": ["w5 w6 w7", "w200 w9 w13"]}
    lines = [f"base_model: {work}/base", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts:"]
    for name, positive in prompts.items():
        lines += [f"  - source_model: {work}/{name}", f"    positive_prompts: {json.dumps(positive)}"]
    return "\n".join(lines) + "\n"


def cases(work: str, root: str, capabilities: list[str], gate_modes: list[str]) -> list[dict]:
    """Per table: a title, the spec file, how many models one merge reads, and the three commands (each
    writing to its own output folders, deleted before and after every run)."""
    ours, out = [sys.executable, "-m", "mergekit_lite"], os.path.join(root, "out")
    bin_dir = os.path.dirname(sys.executable)
    found = []
    for capability in capabilities:
        modes = gate_modes if capability == "moe" else [None]
        for mode in modes:
            if capability == "union":
                title, text, inputs = "tokenizer union (linear, 3 inputs)", union_spec(root), 3
                command, theirs = ["run"], [os.path.join(bin_dir, "mergekit-yaml")]
            elif capability == "multi":
                title, text, inputs = "multi-stage (linear soup, then slerp with the base)", multi_spec(work), 2
                command, theirs = ["run"], [os.path.join(bin_dir, "mergekit-multi")]
            else:
                title, text, inputs = f"MoE, Mixtral, 2 experts, gate_mode {mode}", moe_spec(work, mode), 3
                command, theirs = ["moe"], [os.path.join(bin_dir, "mergekit-moe")]
            spec = os.path.join(root, f"{capability}{'-' + mode if mode else ''}.yaml")
            with open(spec, "w") as f:
                f.write(text)
            if capability == "multi":
                theirs += [spec, "--intermediate-dir", out + "-mergekit.stages", "--out-path", out + "-mergekit"]
            else:
                theirs += [spec, out + "-mergekit"]
            if capability == "moe":   # the same random routers as ours (--seed 0): torch.manual_seed(0)
                theirs += ["--random-seed", "0"]
            found.append({"capability": capability, "title": title, "inputs": inputs, "commands": {
                "ours": [*ours, *command, spec, out + "-ours", "--quiet"],
                "ours --no-validate": [*ours, *command, spec, out + "-ours", "--quiet", "--no-validate"],
                "mergekit": theirs}})
    return found


def clear_outputs(root: str, tool: str = "") -> None:
    """Delete the outputs of ``tool`` (ours write out-ours*, mergekit out-mergekit*), or all of them."""
    prefix = "out-" + ("mergekit" if tool == "mergekit" else "ours" if tool else "")
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(prefix) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(prefix):   # a lock or other file next to an output
            os.remove(path)


def run_case(case: dict, root: str, rounds: int) -> dict:
    """Every command ``rounds`` times, alternating; medians, or the error of a command that failed. The
    outputs of the last round's ``ours --no-validate`` and mergekit are compared, then deleted."""
    runs: dict[str, list[tuple[float, float, float]]] = {tool: [] for tool in case["commands"]}
    failed: dict[str, str] = {}
    for round_ in range(rounds):
        clear_outputs(root)
        for tool, command in case["commands"].items():
            if tool in failed:
                continue
            clear_outputs(root, tool)
            say(f"{case['title']}: round {round_ + 1}/{rounds}: {tool} ...")
            try:
                runs[tool].append(timed(command))
            except SystemExit as error:   # bench_fold.timed: the command failed; its log's end is the message
                failed[tool] = str(error).strip().splitlines()[-1][:300]
                say(f"  FAILED: {error}")
                continue
            wall, cpu, peak = runs[tool][-1]
            say(f"  {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.2f} GiB")
    comparison = compare(os.path.join(root, "out-ours"), os.path.join(root, "out-mergekit")) if not failed else ""
    clear_outputs(root)
    medians = {tool: {key: statistics.median(r[i] for r in rs) for i, key in enumerate(("wall", "cpu", "rss_gib"))}
               for tool, rs in runs.items() if tool not in failed}
    return {"runs": medians, "failed": failed, "comparison": comparison}


def tensors(folder: str) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of an output folder: its file and shape (from the headers)."""
    from safetensors import safe_open

    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    found[key] = (os.path.join(folder, name), f.get_slice(key).get_shape())
    return found


def token_rows(ours: str, theirs: str) -> tuple[str, object]:
    """How the two outputs' vocabularies relate, and the rows of mergekit's embeddings in our token order
    (None when the ids are the same). mergekit's union numbers added tokens in the order of a Python set of
    models, which changes with PYTHONHASHSEED from run to run; ours follow the spec's order."""
    files = [os.path.join(folder, "tokenizer.json") for folder in (ours, theirs)]
    if not all(os.path.exists(f) for f in files):
        return "", None
    import torch
    from tokenizers import Tokenizer

    a, b = (Tokenizer.from_file(f).get_vocab(True) for f in files)
    if a == b:
        return " Same tokenizer vocabulary and ids (added tokens included).", None
    if set(a) != set(b):
        return f" The tokenizers differ: {len(set(a) ^ set(b))} tokens in only one of them.", None
    moved = sorted(t for t in a if a[t] != b[t])
    order = torch.arange(max(a.values()) + 1)
    order[[a[t] for t in moved]] = torch.tensor([b[t] for t in moved])
    text = (f" Same tokens; {len(moved)} with other ids ({', '.join(moved[:4])}: mergekit's union orders added "
            "tokens by a Python set, so by PYTHONHASHSEED); embedding rows compared token by token.")
    return text, order


def compare(ours: str, theirs: str) -> str:
    """One sentence: do the two outputs hold the same tensors (names, shapes; how close) and tokens?"""
    from safetensors import safe_open

    a_index, b_index = tensors(ours), tensors(theirs)
    tokens, order = token_rows(ours, theirs)
    shapes = exact = 0
    worst, worst_name = 0.0, ""
    for key, (path, dims) in a_index.items():
        if key not in b_index or b_index[key][1] != dims:
            continue
        shapes += 1
        with safe_open(path, "pt") as f, safe_open(b_index[key][0], "pt") as g:
            a, b = f.get_tensor(key).float(), g.get_tensor(key).float()
        if order is not None and ("embed_tokens" in key or "lm_head" in key) and len(b) >= len(order):
            b[: len(order)] = b[order]
        difference = (a - b).abs().max().item() if a.numel() else 0.0
        exact += difference == 0
        if difference > worst:
            worst, worst_name = difference, key
    text = (f"Output check (ours --no-validate against mergekit): {shapes} of {len(a_index)} tensors (mergekit: "
            f"{len(b_index)}) with the same name and shape, {exact} bit-identical")
    return text + (f"; largest difference {worst:.3g} ({worst_name})." if worst else ".") + tokens


NAMES = {"union": ("`merge run SPEC OUT`", "`mergekit-yaml SPEC OUT`"),
         "multi": ("`merge run FILE OUT`", "`mergekit-multi FILE --intermediate-dir DIR --out-path OUT`"),
         "moe": ("`merge moe CONFIG OUT`", "`mergekit-moe CONFIG OUT`")}


def print_table(result: dict, report: dict) -> None:
    bound = result["rss_bound_gib"]
    ours, theirs = NAMES[result["capability"]]
    print(f"\n**{result['title']}, {report['size']}: inputs of {report['parameters'] / 1e6:.0f}M parameters, bf16** "
          f"({report['machine']}; medians of {report['rounds']} alternating runs, each a fresh process, warm page "
          f"cache; load average {report['load_before']} before, {report['load_after']} after). Memory bound: "
          f"({result['inputs']} inputs + 2) x the largest tensor in float32 + 300 MB = {bound:.2f} GiB.\n")
    print("| command | wall s | CPU s | peak RSS GiB | / mergekit (wall) | within the memory bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    labels = {"ours": f"{ours} (default: validates)", "ours --no-validate": f"{ours} --no-validate",
              "mergekit": f"mergekit 0.1.5: {theirs}"}
    reference = result["runs"].get("mergekit", {}).get("wall")
    for tool, label in labels.items():
        if tool in result["failed"]:
            print(table_row([label, "failed", "", "", "", result["failed"][tool].replace("|", "/")]))
            continue
        r = result["runs"][tool]
        print(table_row([label, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['rss_gib']:.2f}",
                         ratio(r["wall"], reference), "yes" if r["rss_gib"] <= bound else "no"]))
    if result["comparison"]:
        print(f"\n{result['comparison']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "1b"), default="1b")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(CAPABILITIES), help="capabilities to time: union,multi,moe")
    parser.add_argument("--gate-modes", default=",".join(GATE_MODES), help="MoE routers: random,cheap_embed,hidden")
    parser.add_argument("--work", default="bench_work")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    capabilities, modes = args.only.split(","), args.gate_modes.split(",")
    wrong = sorted(set(capabilities) - set(CAPABILITIES)) + sorted(set(modes) - set(GATE_MODES))
    if wrong:
        parser.error(f"unknown capability or gate mode {', '.join(wrong)}; choose from {CAPABILITIES} {GATE_MODES}")
    shape = SIZES[args.size]
    work = os.path.abspath(os.path.join(args.work, args.size))
    say(f"fixtures in {work} ({parameter_count(shape) / 1e6:.0f}M parameters each; built only when missing)")
    build_models(work, shape, 3)
    root = tokenizer_models(work, shape)
    report = {"size": args.size, "parameters": parameter_count(shape), "rounds": args.rounds, "machine": machine(),
              "load_before": load_average(), "results": []}
    for case in cases(work, root, capabilities, modes):
        report["results"].append({"capability": case["capability"], "title": case["title"], "inputs": case["inputs"],
                                  "rss_bound_gib": rss_bound_gib(shape, case["inputs"]),
                                  **run_case(case, root, args.rounds)})
    report["load_after"] = load_average()
    for result in report["results"]:
        print_table(result, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
