"""Hostile inputs: the output's place. A merge deletes or replaces only what it wrote and recognises as its own
(an output with its merge_run.json, its own partial folder, its own lock file); anything else in the way is
refused, naming what was found, before any tensor is read."""


from __future__ import annotations

from pathlib import Path

from .catalogue import Models, Scenario, case, linear_spec
from .lora import fold_case

PARTIAL_MARKER = ".mergekit_lite-partial.json"
LOCK_SUFFIX = ".mergekit_lite.lock"
NOT_OURS_HINT = ("Hint: choose another output path with -o, or move your files out of the folder first (--overwrite "
                 "replaces only the output of an earlier merge, or an empty folder)\n")
MOVE_PARTIAL_HINT = ("Hint: a merge writes its unfinished output under this name: move it away (or delete it "
                     "yourself), or choose another output path with -o\n")


def run_to(tmp: Path, spec: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(spec), "-o", str(out), "--no-validate", "--quiet", *extra]


def users_folder(folder: Path) -> Path:
    """A folder of the user's own work: a file and a subfolder."""
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\chapter{Results}\n")
    (folder / "notes" / "todo.md").write_text("- merge the models\n")
    return folder


def merged(tmp: Path, models: Models, name: str = "mywork") -> tuple[Path, Path]:
    """(spec, an output this tool wrote at tmp/name)."""
    from mergekit_lite import run_merge

    spec = linear_spec(tmp, models.a, models.b)
    run_merge(str(spec), tmp / name, progress=False, validate=False)
    return spec, tmp / name


@case("output ownership")
def overwrite_of_a_folder_no_merge_wrote(tmp: Path, models: Models) -> Scenario:
    mywork = users_folder(tmp / "mywork")
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {mywork}: this folder was not written by a merge (it has no merge_run.json; found "
                    "notes/, thesis.tex), so a merge never replaces it\n" + NOT_OURS_HINT, preserved=(mywork,))


@case("output ownership")
def non_empty_folder_without_overwrite(tmp: Path, models: Models) -> Scenario:
    mywork = users_folder(tmp / "mywork")
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, mywork), 2,
                    f"error: {mywork}: this folder was not written by a merge (it has no merge_run.json; found "
                    "notes/, thesis.tex), so a merge never replaces it\n" + NOT_OURS_HINT, preserved=(mywork,))


@case("output ownership")
def overwrite_of_an_output_with_the_users_files_added(tmp: Path, models: Models) -> Scenario:
    spec, mywork = merged(tmp, models)
    (mywork / "my_eval.json").write_text('{"mmlu": 0.61}\n')
    (mywork / "plots").mkdir()
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {mywork}: the folder holds files that no merge wrote (my_eval.json, plots/), so a merge "
                    "never replaces it\n" + NOT_OURS_HINT, preserved=(mywork,))


@case("output ownership")
def overwrite_of_an_output_of_another_tool(tmp: Path, models: Models) -> Scenario:
    spec, mywork = merged(tmp, models)
    (mywork / "merge_run.json").write_text('{"tool": "other-merger", "seed": 0}\n')
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {mywork}: this folder was not written by mergekit_lite (its merge_run.json names "
                    "another tool), so a merge never replaces it\n" + NOT_OURS_HINT, preserved=(mywork,))


@case("output ownership")
def overwrite_of_an_output_with_a_shard_its_index_does_not_list(tmp: Path, models: Models) -> Scenario:
    spec, mywork = merged(tmp, models)
    (mywork / "model-00007-of-00009.safetensors").write_bytes(b"someone else's shard")
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {mywork}: the folder holds files that no merge wrote "
                    "(model-00007-of-00009.safetensors), so a merge never replaces it\n" + NOT_OURS_HINT,
                    preserved=(mywork,))


@case("output ownership")
def fold_overwrite_of_a_folder_no_merge_wrote(tmp: Path, models: Models) -> Scenario:
    args, _ = fold_case(tmp, models, lambda adapter: None, "--overwrite")
    mywork = users_folder(tmp / "mywork")
    args[args.index("-o") + 1] = str(mywork)
    return Scenario(args, 2, f"error: {mywork}: this folder was not written by a merge (it has no merge_run.json; "
                             "found notes/, thesis.tex), so a merge never replaces it\n" + NOT_OURS_HINT,
                    preserved=(mywork,))


@case("output ownership")
def lock_file_name_of_another_tool(tmp: Path, models: Models) -> Scenario:
    """`-o uv` next to uv's own uv.lock: the merge's lock has a name no other tool uses."""
    (tmp / "uv.lock").write_text("version = 1\n")
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "uv"), 0, "", preserved=(tmp / "uv.lock",))


@case("output ownership")
def old_lock_name_planted_as_a_link(tmp: Path, models: Models) -> Scenario:
    victim = tmp / "victim.txt"
    victim.write_text("precious")
    (tmp / "merged.lock").symlink_to(victim)
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "merged"), 0, "", preserved=(victim, tmp / "merged.lock"))


@case("output ownership")
def lock_planted_as_a_link(tmp: Path, models: Models) -> Scenario:
    victim = tmp / "victim.txt"
    victim.write_text("precious")
    lock = tmp / f"merged{LOCK_SUFFIX}"
    lock.symlink_to(victim)
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "merged"), 2,
                    f"error: {lock}: the lock file is a symbolic link, which a merge never makes\n"
                    "Hint: delete the link yourself (what it points to is not a lock), or choose another output path "
                    "with -o\n", preserved=(victim, lock))


@case("output ownership")
def lock_name_held_by_a_file_that_is_no_lock(tmp: Path, models: Models) -> Scenario:
    lock = tmp / f"merged{LOCK_SUFFIX}"
    lock.write_text("not a lock: someone's notes\n")
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "merged"), 2,
                    f"error: {lock}: this file is where the merge keeps its lock, but it is not a lock file of "
                    "mergekit_lite\nHint: move it away, or choose another output path with -o\n", preserved=(lock,))


@case("output ownership")
def partial_folder_no_merge_made(tmp: Path, models: Models) -> Scenario:
    partial = tmp / "mywork.partial"
    partial.mkdir()
    (partial / "draft.txt").write_text("second draft\n")
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "mywork"), 2,
                    f"error: {partial}: this folder was not made by a merge (it has no {PARTIAL_MARKER}; found "
                    "draft.txt), and a merge writes its unfinished output under this name\n" + MOVE_PARTIAL_HINT,
                    preserved=(partial,))


@case("output ownership")
def partial_folder_is_a_link(tmp: Path, models: Models) -> Scenario:
    elsewhere = users_folder(tmp / "elsewhere")
    partial = tmp / "mywork.partial"
    partial.symlink_to(elsewhere, target_is_directory=True)
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, tmp / "mywork"), 2,
                    f"error: {partial}: the partial output folder is a symbolic link, which a merge never makes\n"
                    + MOVE_PARTIAL_HINT, preserved=(partial, elsewhere))


@case("output ownership")
def old_folder_next_to_the_output(tmp: Path, models: Models) -> Scenario:
    """OUT.old is the user's: replacing OUT (an output of ours, --overwrite) never touches it."""
    spec, mywork = merged(tmp, models)
    old = users_folder(tmp / "mywork.old")
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 0, "", preserved=(old,))


@case("output ownership")
def input_inside_the_partial_folder(tmp: Path, models: Models) -> Scenario:
    partial = tmp / "mywork.partial"
    inside = models.copy(models.b, partial / "b")
    spec = linear_spec(tmp, models.a, inside)
    return Scenario(run_to(tmp, spec, tmp / "mywork"), 2,
                    f"error: {partial}: the partial output folder contains input model folder {inside}\n"
                    "Hint: move the model out of it (a merge replaces that folder) and give its new path\n",
                    preserved=(partial,))


@case("output ownership")
def input_inside_the_output(tmp: Path, models: Models) -> Scenario:
    spec, mywork = merged(tmp, models)
    inside = models.copy(models.b, mywork / "b")
    spec = linear_spec(tmp, models.a, inside, name="inside.yaml")
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {mywork}: the output folder contains input model folder {inside}\n"
                    "Hint: choose an output path that does not hold an input (it may be replaced)\n",
                    preserved=(mywork,))


@case("output ownership")
def spec_inside_the_output(tmp: Path, models: Models) -> Scenario:
    """Replaying an output's own mergekit_config.yml into that output: the spec would be replaced."""
    _, mywork = merged(tmp, models)
    spec = mywork / "mergekit_config.yml"
    return Scenario(run_to(tmp, spec, mywork, "--overwrite"), 2,
                    f"error: {spec}: the spec file is inside the output folder {mywork}, which this merge replaces\n"
                    f"Hint: copy it elsewhere first (e.g. cp {spec} spec.yaml) and run that copy\n",
                    preserved=(mywork,))


@case("output ownership")
def output_is_the_current_folder(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, Path(".")), 2,
                    "error: .: the output path is the current folder or one that holds it, which a merge cannot "
                    "replace (it writes a new folder and renames it into place)\n"
                    "Hint: give the path of a new folder, e.g. -o merged\n")


@case("output ownership")
def output_path_empty(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    args = run_to(tmp, spec, Path("."))
    args[args.index("-o") + 1] = ""
    return Scenario(args, 2, "error: the output path is empty\nHint: give the path of a new folder, e.g. -o merged\n")


@case("output ownership")
def output_is_a_link_to_a_folder(tmp: Path, models: Models) -> Scenario:
    real = tmp / "real"
    real.mkdir()
    mywork = tmp / "mywork"
    mywork.symlink_to(real, target_is_directory=True)
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run_to(tmp, spec, mywork), 2,
                    f"error: {mywork}: the output path is a symbolic link (to {real}); a merge replaces the folder at "
                    "its path, never what a link points to\nHint: give the folder itself as -o, or choose another "
                    "output path\n", preserved=(mywork, real))
