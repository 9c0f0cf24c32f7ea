"""Run every hostile-input case as a real `merge` process and print the README's table.

    python scripts/hostile_report.py                    # catalogue + environment + 60 s of fuzzing + 200 specs
    python scripts/hostile_report.py --fuzz-seconds 600 --specs 1000

For each case of tests/helpers/hostile/ it builds the damaged input in a fresh folder, runs
`python -m mergekit_lite ...` with an audit hook that records any attempt to start a process or call
os.system, and checks: the exit code and stderr are exactly the expected ones; the file the planted code
(a pickle or a YAML tag) would write does not exist and no process was started ("code executed"); OUT does
not exist, nothing in OUT.partial can pass for a finished output, and the shared input models are
byte-identical afterwards ("outputs corrupted"). Then the environment cases (a full disk on a real tmpfs
when it can mount one, a second merge into the same OUT, SIGINT mid-merge), the parser fuzzers of
scripts/fuzz_headers.py, and random specs (tests/test_spec_properties.py) through the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from helpers.hostile import CASES, build_models, leftover_problems, linear_spec, snapshot  # noqa: E402

AUDITED = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")
LAUNCHER = f"""
import sys
log = open(sys.argv.pop(1), "a")
def hook(event, args):
    if event in {AUDITED!r}:
        log.write(event + "\\n"); log.flush()
sys.addaudithook(hook)
from mergekit_lite.cli import main
sys.argv[0] = "merge"
main()
"""


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def merge(args: list[str], audit: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(audit), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


class Row:
    def __init__(self) -> None:
        self.tried = self.exact = self.executed = self.corrupted = 0
        self.codes: Counter = Counter()

    def add(self, code: int, exact: bool, executed: bool, corrupted: bool) -> None:
        self.tried += 1
        self.exact += exact
        self.codes[code] += 1
        self.executed += executed
        self.corrupted += corrupted


def run_catalogue(work: Path) -> dict[str, Row]:
    models = build_models(work / "models")
    before = digest(models.root)
    rows: dict[str, Row] = defaultdict(Row)
    for case in CASES:
        folder = work / case.name
        folder.mkdir()
        scenario = case.build(folder, models)
        kept = snapshot(scenario.preserved)
        audit = folder / "audit.log"
        process = merge(scenario.args, audit)
        stdout, stderr = process.communicate(timeout=600)
        spawned = audit.exists() and audit.read_text().strip() != ""
        executed = spawned or (scenario.marker is not None and scenario.marker.exists())
        problems = leftover_problems(folder / "out")
        corrupted = bool(problems) or digest(models.root) != before or snapshot(scenario.preserved) != kept
        exact = (process.returncode, stderr) == (scenario.code, scenario.stderr)
        if not exact or executed or corrupted:
            print(f"  {case.name}: exit {process.returncode}, exact={exact}, executed={executed}, {problems}\n"
                  f"    got:      {stderr!r}\n    expected: {scenario.stderr!r}", file=sys.stderr)
        rows[case.group].add(process.returncode, exact, executed, corrupted)
    return rows


def run_environment(work: Path) -> dict[str, Row]:
    models = build_models(work / "env-models")
    rows: dict[str, Row] = defaultdict(Row)
    spec = linear_spec(work, models.a, models.b)

    # A full disk: a real 64 kB tmpfs, with a file taking most of it.
    disk = work / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            (disk / "filler").write_bytes(b"\0" * 48 * 1024)
            process = merge(["run", str(spec), "-o", str(disk / "out"), "--quiet"], work / "audit-disk.log")
            _, stderr = process.communicate(timeout=600)
            exact = stderr.startswith(f"error: {disk / 'out'}: the merged tensors need ") and \
                stderr.endswith(" is free there\nHint: free some disk space, or write the output elsewhere with -o\n")
            rows["environment: disk full"].add(process.returncode, exact, False,
                                               bool(leftover_problems(disk / "out")) or
                                               sorted(os.listdir(disk)) != ["filler"])
        finally:
            subprocess.run(["umount", str(disk)], check=False)
    else:
        print("  (cannot mount a tmpfs: the disk-full case is covered by the tests' write hook only)", file=sys.stderr)

    # Two merges into one OUT, and SIGINT: the first run pauses mid-merge (tests/helpers/paused_merge.py).
    for name in ("second merge", "SIGINT"):
        folder = work / name.replace(" ", "-")
        folder.mkdir()
        out = folder / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "paused_merge.py"), str(folder), "run",
                                  str(spec), "-o", str(out), "--quiet", "--no-validate"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        while not (folder / "paused").exists():
            if first.poll() is not None:
                raise RuntimeError(first.communicate())
            time.sleep(0.02)
        if name == "second merge":
            second = merge(["run", str(spec), "-o", str(out), "--quiet"], folder / "audit.log")
            _, stderr = second.communicate(timeout=600)
            exact = stderr == (f"error: {out}: another merge (process {first.pid}) is writing this output now\n"
                               "Hint: wait for it to finish, or write to another output path with -o\n")
            (folder / "go").touch()
            first.communicate(timeout=600)
            from mergekit_lite import validate

            corrupted = first.returncode != 0 or not validate(out, device="cpu", forward=False).passed
            rows["environment: same OUT twice"].add(second.returncode, exact, False, corrupted)
        else:
            first.send_signal(signal.SIGINT)
            _, stderr = first.communicate(timeout=600)
            from mergekit_lite.output.folder import LEFTOVER

            exact = stderr == f"interrupted: {out} was not written; the unfinished files are in {out}.partial ({LEFTOVER})\n"
            rows["environment: SIGINT"].add(first.returncode, exact, False, bool(leftover_problems(out)))
    return rows


def run_fuzz(seconds: float) -> dict[str, Counter]:
    import fuzz_headers

    return fuzz_headers.run(seconds) if seconds > 0 else {}


def run_specs(work: Path, examples: int) -> Row:
    """Random specs (the property test's generator) through the CLI in-process: a merge or one of our errors."""
    import test_spec_properties as props
    from click.testing import CliRunner
    from hypothesis import HealthCheck, given, settings

    from mergekit_lite.cli import cli

    models = build_models(work / "spec-models")
    row = Row()
    runner = CliRunner()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(props.specs(models))
    def check(spec):
        result, out = props.run_spec(lambda *a: runner.invoke(cli, [str(x) for x in a], catch_exceptions=False),
                                     spec, work, "--no-validate")
        props.assert_ours(result)
        corrupted = False
        if result.exit_code == 0:
            corrupted = not all(bool(t.isfinite().all()) for t in props.read_folder(out).values()
                                if t.is_floating_point())
        row.add(result.exit_code, True, False, corrupted)

    check()
    return row


def table(rows: dict[str, Row], fuzz: dict[str, Counter], specs: Row | None) -> str:
    lines = ["| input | cases tried | exact message and exit code | exit codes | code executed | outputs corrupted |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(row.codes.items()))
        lines.append(f"| {name} | {row.tried} | {row.exact} | {codes} | {row.executed} | {row.corrupted} |")
    if specs is not None:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(specs.codes.items()))
        lines.append(f"| random specs (hypothesis, real merges) | {specs.tried} | one `error:` line + hint each | "
                     f"{codes} | 0 | {specs.corrupted} |")
    for name, outcomes in fuzz.items():
        refused = sum(v for k, v in outcomes.items() if k.startswith("refused"))
        lines.append(f"| fuzz: {name} | {sum(outcomes.values())} | {refused} refused with our error, "
                     f"{outcomes['accepted']} accepted and consistent, 0 other | - | 0 | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-seconds", type=float, default=60)
    parser.add_argument("--specs", type=int, default=200, help="random specs to merge (0: none)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = run_catalogue(Path(work))
        rows.update(run_environment(Path(work)))
        specs = run_specs(Path(work) / "specs", args.specs) if args.specs else None
    fuzz = run_fuzz(args.fuzz_seconds)
    print(table(rows, fuzz, specs))
    print(f"\n({len(CASES)} catalogue cases, {time.perf_counter() - started:.0f} s, {sys.platform}, "
          f"python {sys.version.split()[0]})")
    bad = [n for n, r in rows.items() if r.exact != r.tried or r.executed or r.corrupted]
    if bad or (specs and specs.corrupted):
        sys.exit(f"FAILED: {bad}")


if __name__ == "__main__":
    main()
