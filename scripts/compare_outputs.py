"""Check that a refactor changes no output: run the same merges with two checkouts and compare the files.

Usage: python scripts/compare_outputs.py OLD_CHECKOUT NEW_CHECKOUT [--work DIR] [--jobs N] [--keep]

Every merge runs as `python -m mergekit_lite ...` in a fresh process, with PYTHONPATH=<checkout> first, so the
package imported is that checkout's even though the venv holds an editable install of another one (the
editable finder comes after PYTHONPATH's PathFinder; a probe prints mergekit_lite.__file__ per checkout, in
the driver and in a Ray worker, and stops if it is not inside the checkout). Only the standard library is used
here: this script imports neither checkout.

Inputs are made once and shared by both runs: OLD_CHECKOUT's scripts/make_demo_models.py writes
WORK/demo/models (base, ft-a, ft-b, ft-c) and WORK/demo/adapters (chat, code, style); the specs are
OLD_CHECKOUT's merge_configs/, copied to WORK/merge_configs/ (the spec text is part of the output: the card
and mergekit_config.yml quote it). Every merge runs with cwd=WORK so the specs' relative paths
(demo/models/...) resolve, and writes WORK/runs/<old|new>/<case>/merged (the same folder name everywhere:
the card names it).

Cases:
  example:<name>  every merge_configs/*.yaml: merge run --no-validate --max-shard-size 2MB (several shards)
  demo            `make demo`'s command: merge run merge_configs/demo.yaml -o ... --overwrite (validated)
  fold:chat+code  merge fold base chat code --weight 0.7 --weight 0.5 (two adapters, one rsLoRA; 2MB shards)
  fold:style      merge fold base style (a DoRA adapter)
  resume          della.yaml (random, seeded: --seed 7) in 100kB shards (57 of them): killed (SIGSTOP, then
                  SIGKILL) once its journal records a few finished shards, then `merge run --resume`; the
                  CLI must report kept shards, and the result must also equal an uninterrupted run's
  ray             dare_ties.yaml (random, chunked) with --executor ray and no --ray-address: the tool starts a
                  local Ray (in a private RAY_TMPDIR, so it never joins another Ray instance on this machine);
                  the result must also equal the local example:dare_ties output (same options)

Each case's output folders are compared file by file (sha256, every file, hidden ones included). No field is
excluded: NORMALIZED below is empty, because no file differs between runs (no timestamps or timings are
written into outputs; the version string is the same in both checkouts). A file that legitimately differs
would be listed there with its reason, and compared with just that JSON field removed.

All processes run with OMP_NUM_THREADS=1 (as `make test` does; parallel float reductions could otherwise
depend on the thread count) and offline (HF_HUB_OFFLINE=1). Exit status: 0 when every case is identical,
1 on any difference or failed run. Takes about 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SIDES = ("old", "new")
OUT_NAME = "merged"
MARKER = ".compare_outputs"            # a work folder this script made (only such a folder is emptied)
EXAMPLE_SHARD = "2MB"
RESUME_SPEC, RESUME_SHARD, RESUME_SEED = "della.yaml", "100kB", "7"
RAY_SPEC = "dare_ties.yaml"
JOURNAL_GLOB = "*journal*"             # OUT.partial/.mergekit_lite-journal.jsonl: a head line, then one per shard
TIMEOUT = 600

# Fields removed before comparing, as (file glob, top-level JSON key, reason). Empty: every byte is compared.
NORMALIZED: list[tuple[str, str, str]] = []

PROBE = "import mergekit_lite; print(mergekit_lite.__file__)"
RAY_PROBE = """\
import mergekit_lite, ray
ray.init(log_to_driver=False, logging_level="ERROR")   # as executors/ray.py starts a local instance


@ray.remote(num_cpus=1)
def where():
    import mergekit_lite
    return mergekit_lite.__file__


print(ray.get(where.remote()))
ray.shutdown()
"""


@dataclass
class Side:
    name: str
    checkout: str
    env: dict
    ray_tmp: str
    package: str = ""
    error: str = ""          # the checkout cannot run at all (e.g. it does not import): nothing is compared


@dataclass
class Case:
    name: str
    args: list[str]          # the CLI arguments after `python -m mergekit_lite`; {out} is the output folder
    kind: str = "plain"      # plain, resume or ray
    note: dict = field(default_factory=dict)    # side -> extra text for the table


@dataclass
class Row:
    case: str
    files: str
    identical: bool
    note: str = ""
    details: list[str] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="checkout before the change (also generates the input models)")
    parser.add_argument("new", help="checkout after the change")
    parser.add_argument("--work", help="work folder (default: a new temporary folder, removed when all is "
                                       "identical unless --keep)")
    parser.add_argument("--jobs", type=int, default=2, help="merges run at once for the plain cases (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run the checkouts with")
    options = parser.parse_args()
    started = time.monotonic()

    checkouts = [os.path.realpath(options.old), os.path.realpath(options.new)]
    for path in checkouts:
        if not os.path.isdir(os.path.join(path, "mergekit_lite")):
            parser.error(f"{path} is not a mergekit_lite checkout (no mergekit_lite/ folder)")
    temporary = options.work is None
    work = os.path.realpath(options.work or tempfile.mkdtemp(prefix="compare_outputs-"))
    prepare_work(work, parser)
    print(f"work folder: {work}")

    sides = [make_side(name, path) for name, path in zip(SIDES, checkouts)]
    try:
        for side in sides:
            probe(side, options.python, work)
            print(f"{side.name}: {side.checkout} -> mergekit_lite from {side.package or '(none)'}"
                  + (f"\n     ERROR: {side.error}" if side.error else ""))
        if any(side.error for side in sides):
            print("a checkout cannot run: nothing to compare")
            if temporary and not options.keep:
                shutil.rmtree(work, ignore_errors=True)
            return 1
        make_inputs(sides[0], options.python, work)
        cases = make_cases(work, checkouts)
        rows = run_cases(cases, sides, options, work)
    finally:
        for side in sides:
            shutil.rmtree(side.ray_tmp, ignore_errors=True)

    print_table(rows)
    seconds = time.monotonic() - started
    failed = [r for r in rows if not r.identical]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} identical; {seconds:.0f} s "
          f"({os.cpu_count()} CPUs, {options.python})")
    print("normalized fields: " + ("; ".join(f"{g}: {k} ({why})" for g, k, why in NORMALIZED) if NORMALIZED
                                   else "none (every file compared byte for byte)"))
    if temporary and not failed and not options.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif failed:
        print(f"outputs and logs kept in {work}/runs and {work}/logs")
    return 1 if failed else 0


# ---------------------------------------------------------------- setup

def prepare_work(work: str, parser: argparse.ArgumentParser) -> None:
    """An empty folder, or one this script made before (its previous runs and models are removed)."""
    os.makedirs(work, exist_ok=True)
    if os.path.exists(os.path.join(work, "mergekit_lite")):
        parser.error(f"{work} holds a mergekit_lite package: as the current folder it would shadow PYTHONPATH")
    entries = set(os.listdir(work))
    if entries and MARKER not in entries:
        parser.error(f"{work} is not empty and was not made by this script; give an empty or new folder")
    for name in ("demo", "runs", "logs", "merge_configs"):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    open(os.path.join(work, MARKER), "w").close()
    os.makedirs(os.path.join(work, "logs"))


def make_side(name: str, checkout: str) -> Side:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    # A short private Ray temp folder (Unix socket paths are limited to 107 bytes): ray.init(address=None)
    # joins the latest instance recorded in its temp folder, which must never be someone else's.
    ray_tmp = tempfile.mkdtemp(prefix=f"cmpray-{name}-", dir="/tmp")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONDONTWRITEBYTECODE="1")
    env.pop("RAY_ADDRESS", None)
    return Side(name, checkout, env, ray_tmp)


def inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.join(os.path.realpath(folder), ""))


def probe(side: Side, python: str, work: str) -> None:
    """Which mergekit_lite a process started like the merges imports (same interpreter, env and cwd)."""
    done = subprocess.run([python, "-c", PROBE], check=False, cwd=work, env=side.env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if done.returncode != 0:
        side.error = "cannot import mergekit_lite: " + last_lines(done.stderr, 3)
        return
    side.package = done.stdout.strip()
    if not inside(side.package, side.checkout):
        side.error = f"imports {side.package}, not the checkout's package (PYTHONPATH is not first?)"


def ray_probe(side: Side, python: str, work: str) -> tuple[str | None, str]:
    """(an error or None, the package a Ray worker of a local instance started by this environment imports)."""
    done = subprocess.run([python, "-c", RAY_PROBE], check=False, cwd=work, env=side.env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        return "Ray probe failed: " + last_lines(done.stderr, 3), ""
    found = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if not inside(found, side.checkout):
        return f"a Ray worker imports {found or '?'}, not the checkout's", found
    return None, found


def make_inputs(old: Side, python: str, work: str) -> None:
    """The demo models and adapters, with the old checkout's generator (relative paths: the adapters' configs
    name demo/models/base, as the specs do), and the old checkout's specs."""
    script = os.path.join(old.checkout, "scripts", "make_demo_models.py")
    done = subprocess.run([python, script, "demo/models"], check=False, cwd=work, env=old.env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        sys.exit(f"make_demo_models.py failed:\n{done.stderr}")
    print(done.stdout.strip())
    shutil.copytree(os.path.join(old.checkout, "merge_configs"), os.path.join(work, "merge_configs"))


def make_cases(work: str, checkouts: list[str]) -> list[Case]:
    specs = sorted(f for f in os.listdir(os.path.join(work, "merge_configs")) if f.endswith((".yaml", ".yml")))
    theirs = os.path.join(checkouts[1], "merge_configs")
    if os.path.isdir(theirs):
        changed = [f for f in sorted(set(specs) | set(os.listdir(theirs))) if f.endswith((".yaml", ".yml"))
                   and (f not in specs or not os.path.exists(os.path.join(theirs, f))
                        or read(os.path.join(work, "merge_configs", f)) != read(os.path.join(theirs, f)))]
        if changed:
            print(f"note: merge_configs/ differs in the new checkout ({', '.join(changed)}); "
                  "both runs use the old checkout's specs")
    cases = [Case(f"example:{os.path.splitext(f)[0]}",
                  ["run", f"merge_configs/{f}", "-o", "{out}", "--no-validate", "--quiet",
                   "--max-shard-size", EXAMPLE_SHARD]) for f in specs]
    cases += [
        Case("demo", ["run", "merge_configs/demo.yaml", "-o", "{out}", "--overwrite"]),   # `make demo`
        Case("fold:chat+code", ["fold", "demo/models/base", "demo/adapters/chat", "demo/adapters/code",
                                "--weight", "0.7", "--weight", "0.5", "-o", "{out}", "--quiet",
                                "--max-shard-size", EXAMPLE_SHARD]),
        Case("fold:style", ["fold", "demo/models/base", "demo/adapters/style", "-o", "{out}", "--quiet"]),
        Case("resume", ["run", f"merge_configs/{RESUME_SPEC}", "-o", "{out}", "--no-validate",
                        "--max-shard-size", RESUME_SHARD, "--seed", RESUME_SEED], kind="resume"),
        Case("ray", ["run", f"merge_configs/{RAY_SPEC}", "-o", "{out}", "--no-validate", "--quiet",
                     "--max-shard-size", EXAMPLE_SHARD, "--executor", "ray"], kind="ray"),
    ]
    return cases


# ---------------------------------------------------------------- running

def out_dir(work: str, side: str, case: str) -> str:
    return os.path.join(work, "runs", side, case.replace(":", "_"), OUT_NAME)


def cli(side: Side, python: str, work: str, args: list[str], out: str, log: str,
        ) -> subprocess.CompletedProcess:
    argv = [python, "-m", "mergekit_lite", *[out if a == "{out}" else a for a in args]]
    with open(log, "a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        done = subprocess.run(argv, check=False, cwd=work, env=side.env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        f.write(done.stdout + done.stderr + f"[exit {done.returncode}]\n")
    return done


def run_one(case: Case, side: Side, python: str, work: str) -> str | None:
    """Run a case with one checkout; the error, or None."""
    out = out_dir(work, side.name, case.name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log = os.path.join(work, "logs", f"{side.name}-{case.name.replace(':', '_')}.log")
    if case.kind == "resume":
        return run_resume(case, side, python, work, out, log)
    if case.kind == "ray":
        problem, package = ray_probe(side, python, work)
        if problem:
            return problem
        case.note[side.name] = f"Ray worker imports {package}"
    done = cli(side, python, work, case.args, out, log)
    if done.returncode != 0:
        return f"exit {done.returncode}: {last_lines(done.stderr or done.stdout, 2)}"
    if case.name == "demo":
        case.note[side.name] = last_lines(done.stdout, 1).split(":")[0]      # "Validation passed on cpu in ..."
        if "Validation passed" not in done.stdout:
            return "the demo's validation did not pass: " + last_lines(done.stdout, 2)
    if os.path.exists(out + ".partial"):
        return f"{out}.partial was left behind"
    return None


def journal_records(partial: str) -> int:
    for name in fnmatch.filter(os.listdir(partial), JOURNAL_GLOB) if os.path.isdir(partial) else ():
        try:
            with open(os.path.join(partial, name), "rb") as f:
                return max(0, f.read().count(b"\n") - 1)      # complete lines after the head line
        except OSError:
            return 0
    return 0


def run_resume(case: Case, side: Side, python: str, work: str, out: str, log: str) -> str | None:
    """The uninterrupted reference, then a run killed mid-way and resumed with --resume into ``out``."""
    reference = out_dir(work, side.name, "resume-uninterrupted")
    os.makedirs(os.path.dirname(reference), exist_ok=True)
    done = cli(side, python, work, case.args + ["--quiet"], reference, log)
    if done.returncode != 0:
        return f"uninterrupted run: exit {done.returncode}: {last_lines(done.stderr, 2)}"
    partial = out + ".partial"
    argv = [python, "-m", "mergekit_lite", *[out if a == "{out}" else a for a in case.args], "--quiet"]
    for threshold in (4, 2, 1):   # a run that finished before it could be killed is tried again, killed earlier
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}   # killed after {threshold} finished shard(s)\n")
            f.flush()
            process = subprocess.Popen(argv, cwd=work, env=side.env, stdout=f, stderr=f)
            deadline = time.monotonic() + TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                if journal_records(partial) >= threshold:
                    process.send_signal(signal.SIGSTOP)     # freeze it where it is, then kill it (a crash)
                    process.kill()
                    break
                time.sleep(0.001)
            process.wait()
            f.write(f"[exit {process.returncode}]\n")
        recorded = journal_records(partial)
        if process.returncode == -signal.SIGKILL and recorded and not os.path.exists(out):
            break
    else:
        return "could not interrupt the merge mid-way (it finished before it was killed, three times)"
    done = cli(side, python, work, case.args + ["--resume"], out, log)
    if done.returncode != 0:
        return f"--resume: exit {done.returncode}: {last_lines(done.stderr, 2)}"
    found = re.search(r"(\d+) shard\(s\); (\d+) kept from the interrupted run", done.stdout)
    if not found or int(found.group(2)) == 0:
        return f"--resume kept no shard of the interrupted run ({recorded} recorded): {last_lines(done.stdout, 1)}"
    case.note[side.name] = f"killed after {recorded}, kept {found.group(2)}/{found.group(1)} shards"
    return None


def run_cases(cases: list[Case], sides: list[Side], options, work: str) -> list[Row]:
    """Plain cases a few at a time; then resume (timing-sensitive) and Ray (uses both cores) one at a time."""
    errors: dict[tuple[str, str], str | None] = {}
    plain = [c for c in cases if c.kind == "plain"]
    with concurrent.futures.ThreadPoolExecutor(max(1, options.jobs)) as pool:
        futures = {pool.submit(run_one, c, s, options.python, work): (c.name, s.name) for c in plain for s in sides}
        for future in concurrent.futures.as_completed(futures):
            errors[futures[future]] = future.result()
    for case in (c for c in cases if c.kind != "plain"):
        for side in sides:
            t0 = time.monotonic()
            errors[case.name, side.name] = run_one(case, side, options.python, work)
            print(f"  {case.name} [{side.name}]: {time.monotonic() - t0:.0f} s", flush=True)

    rows = []
    for case in cases:
        failed = [f"{s}: {errors[case.name, s]}" for s in SIDES if errors[case.name, s]]
        note = "; ".join(f"{s}: {case.note[s]}" for s in SIDES if s in case.note)
        if failed:
            rows.append(Row(case.name, "-", False, "run failed", failed))
            continue
        rows.append(compare(case.name, out_dir(work, "old", case.name), out_dir(work, "new", case.name), note))
        # Invariants within each checkout: a resumed run and a Ray run write what a plain local run writes.
        if case.kind in ("resume", "ray"):
            other, label = (("resume-uninterrupted", "resume = uninterrupted") if case.kind == "resume" else
                            (f"example:{os.path.splitext(RAY_SPEC)[0]}", "ray = local"))
            for side in SIDES:
                if errors.get((other, side)):
                    continue
                rows.append(compare(f"{label} [{side}]", out_dir(work, side, case.name),
                                    out_dir(work, side, other)))
    return rows


# ---------------------------------------------------------------- comparing

def files_of(folder: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (NORMALIZED fields removed first)."""
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            with open(path, "rb") as f:
                data = f.read()
            for pattern, key, _ in NORMALIZED:
                if fnmatch.fnmatch(relative, pattern):
                    content = json.loads(data)
                    content.pop(key, None)
                    data = json.dumps(content, sort_keys=True).encode()
            found[relative] = hashlib.sha256(data).hexdigest()
    return found


def compare(name: str, old: str, new: str, note: str = "") -> Row:
    a, b = files_of(old), files_of(new)
    details = [f"only in {label}: {f}" for label, mine, theirs in (("old", a, b), ("new", b, a))
               for f in sorted(set(mine) - set(theirs))]
    for f in sorted(set(a) & set(b)):
        if a[f] != b[f]:
            details.append(f"differs: {f}")
            details += ["    " + line for line in explain(os.path.join(old, f), os.path.join(new, f))]
    count = str(len(a)) if len(a) == len(b) else f"{len(a)}/{len(b)}"
    return Row(name, count, not details, note, details)


def explain(old: str, new: str) -> list[str]:
    """How two files differ: the tensors of a safetensors file, or the first lines of a text diff."""
    if old.endswith(".safetensors"):
        try:
            x, y = safetensors_parts(old), safetensors_parts(new)
        except (ValueError, OSError, struct.error) as exc:
            return [f"(not a readable safetensors file: {exc})"]
        names = sorted(set(x) | set(y))
        diff = [n for n in names if x.get(n) != y.get(n)]
        more = " ..." if len(diff) > 6 else ""
        return [f"{len(diff)} of {len(names)} tensors differ: {', '.join(diff[:6])}{more}"]
    try:
        lines = list(difflib.unified_diff(read(old).splitlines(), read(new).splitlines(), "old", "new", lineterm=""))
        return lines[:20] + (["..."] if len(lines) > 20 else [])
    except UnicodeDecodeError:
        return ["(binary)"]


def safetensors_parts(path: str) -> dict[str, tuple]:
    """Tensor name -> (dtype, shape, sha256 of its bytes); __metadata__ -> its content."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    parts = {}
    for key, info in header.items():
        if key == "__metadata__":
            parts[key] = (json.dumps(info, sort_keys=True),)
        else:
            start, end = info["data_offsets"]
            parts[key] = (info["dtype"], tuple(info["shape"]), hashlib.sha256(data[start:end]).hexdigest())
    return parts


def print_table(rows: list[Row]) -> None:
    width = max(len(r.case) for r in rows)
    print(f"\n{'case':<{width}}  files  identical  note")
    print(f"{'-' * width}  -----  ---------  ----")
    for row in rows:
        print(f"{row.case:<{width}}  {row.files:>5}  {'yes' if row.identical else 'NO':<9}  {row.note}")
    for row in rows:
        if row.details:
            print(f"\n{row.case}:")
            print("\n".join("  " + d for d in row.details[:40]))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def last_lines(text: str, n: int) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


if __name__ == "__main__":
    sys.exit(main())
