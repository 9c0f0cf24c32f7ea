"""Benchmark: the forward check of checkpoints that transformers converts while loading, against loading them whole.

Usage: python scripts/bench_forward.py [--size 1b|tiny] [--rounds 2] [--work bench_work/forward]

Two checkpoints whose stored tensors are not the modules of transformers 5's model, built once with random
weights (bfloat16):
  qwen3-moe    a Qwen3-MoE of 64 experts per layer, stored one tensor per expert (``experts.3.gate_proj.weight``),
               as the Hub stores it; transformers 5 stacks each layer's experts into one tensor while loading.
  qwen2.5-vl   a Qwen2.5-VL, stored in the Hub's layout (``model.layers.*``, ``visual.*``); transformers 5 loads
               it as ``model.language_model.*``, ``model.visual.*``.
  mixtral      a Mixtral of 8 wide experts stored one tensor per expert, whose layer's experts in float32 exceed the
               memory bound (at 1b: 1.4 GB against 0.65 GiB, as two Mixtral 8x7B's 5.6 GB exceed their 2.4 GB), so
               the check reads them one expert at a time (validation/experts.py); it was NOT CHECKED before.
For each, alternated over --rounds, each a fresh process (wall s, CPU s, peak RSS of that process alone, from
scripts/bench_fold.py's launcher): `merge validate FOLDER` (structure, NaN/Inf and the forward pass, which runs
the model layer by layer) and transformers' own whole-model loading in float32 with a forward pass on the same
batch (what the check did for such models before it could stream them, when they fitted its memory bound; above
it, they were not checked). The memory bound is the merge's, (1 + 2) x the largest tensor in float32 + 300 MB for a
folder validated on its own. The losses of both, from one more run of each, must agree. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import load_average, machine, table_row  # noqa: E402
from bench_fold import timed  # noqa: E402

SIZES = {
    "1b": {"moe": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                       num_experts=64, num_experts_per_tok=4),
           "vl": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=4),
           "vision": dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=14),
           "mixtral": dict(vocab_size=32000, hidden_size=1024, intermediate_size=14336, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)},
    "tiny": {"moe": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2),
             "vl": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
             "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4),
             "mixtral": dict(vocab_size=1024, hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                             num_experts_per_tok=2)},
}
# transformers' whole-model loading and a forward pass of the check's batch; prints the batch's loss
WHOLE = """
import sys, torch
from mergekit_lite.validation.inference import _config_of, batch_loss, load_model, logits_of, make_batch
config = _config_of(sys.argv[1])
batch = make_batch(sys.argv[1], config.get("text_config", config)["vocab_size"])
model = load_model(sys.argv[1], torch.device("cpu"))
print(batch_loss(logits_of(model, batch, torch.device("cpu")), batch))
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(folder: str, kind: str, size: str) -> None:
    """A checkpoint of random bfloat16 weights, saved by transformers in its stored layout (shards of 500 MB)."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    import torch
    import transformers

    shapes = SIZES[size]
    if kind == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(**shapes["moe"], norm_topk_prob=True, tie_word_embeddings=False)
        model_class = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**shapes["mixtral"])
        model_class = transformers.MixtralForCausalLM
    else:
        text = dict(shapes["vl"], rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24] if size == "1b"
                                                 else [2, 3, 3]})
        vision = dict(shapes["vision"], out_hidden_size=shapes["vl"]["hidden_size"], spatial_merge_size=2,
                      temporal_patch_size=2, fullatt_block_indexes=[shapes["vision"]["depth"] - 1])
        vocab = shapes["vl"]["vocab_size"]
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                                               video_token_id=vocab - 2, vision_start_token_id=vocab - 3)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    started = time.perf_counter()
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder, max_shard_size="500MB")
    say(f"built {kind} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters) in "
        f"{time.perf_counter() - started:.0f} s")


def bound_gib(folder: str) -> float:
    from mergekit_lite.sources.opener import open_checkpoint

    checkpoint = open_checkpoint(folder)
    checkpoint.close()
    largest = max(info.numel for info in checkpoint.tensors.values())
    return (3 * 4 * largest + 300e6) / 2**30


def commands(folder: str) -> dict[str, list[str]]:
    return {"merge validate FOLDER": [sys.executable, "-m", "mergekit_lite", "validate", folder],
            "transformers: whole model in float32 + forward": [sys.executable, "-c", WHOLE, folder]}


def losses(folder: str) -> tuple[dict, float]:
    """(our forward check's JSON entry, transformers' loss of the whole model on the same batch)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    ours = subprocess.run([sys.executable, "-m", "mergekit_lite", "validate", folder, "--json"], env=env,
                          capture_output=True, text=True)
    forward = next(c for c in json.loads(ours.stdout)["checks"] if c["name"] == "forward")
    whole = subprocess.run([sys.executable, "-c", WHOLE, folder], env=env, capture_output=True, text=True, check=True)
    return forward, float(whole.stdout.split()[-1])


def run(folder: str, rounds: int) -> dict:
    runs: dict[str, list] = {name: [] for name in commands(folder)}
    for index in range(rounds):
        for name, command in commands(folder).items():
            say(f"{os.path.basename(folder)}: {name}, round {index + 1}")
            runs[name].append(timed(command))
    medians = {name: [statistics.median(x[i] for x in values) for i in range(3)] for name, values in runs.items()}
    forward, whole = losses(folder)
    return {"medians": medians, "forward": forward, "whole_loss": whole, "bound_gib": bound_gib(folder)}


def print_table(kind: str, result: dict, rounds: int) -> None:
    forward = result["forward"]
    print(f"\n**{kind}** ({machine()}; medians of {rounds}, each a fresh process, "
          f"warm page cache; load average {load_average()} after). Memory bound: (1 + 2) x the largest tensor in "
          f"float32 + 300 MB = {result['bound_gib']:.2f} GiB.\n")
    print(table_row(["command", "wall s", "CPU s", "peak RSS GiB", "within the memory bound"]))
    print(table_row(["---"] * 5))
    for name, (wall, cpu, rss) in result["medians"].items():
        print(table_row([f"`{name}`" if name.startswith("merge") else name, f"{wall:.1f}", f"{cpu:.1f}",
                         f"{rss:.2f}", "yes" if rss <= result["bound_gib"] else "no"]))
    ours = forward["numbers"].get("merged_loss")
    print(f"\nForward check: {forward['status']} ({forward['seconds']:.1f} s); loss on its batch: ours "
          f"{'-' if ours is None else f'{ours:.6f}'}, "
          f"transformers' whole model {result['whole_loss']:.6f}: "
          f"{'the same' if ours is not None and abs(ours - result['whole_loss']) < 1e-4 else 'DIFFERENT'}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=os.path.join(REPO, "bench_work", "forward"))
    parser.add_argument("--json", help="save the numbers to this file")
    args = parser.parse_args()
    report = {}
    for kind in ("qwen3-moe", "qwen2.5-vl", "mixtral"):
        folder = os.path.abspath(os.path.join(args.work, args.size, kind))
        build(folder, kind, args.size)
        report[kind] = run(folder, args.rounds)
        print_table(kind, report[kind], args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
