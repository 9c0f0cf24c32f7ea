"""Hostile inputs: multi-stage files (mergekit-multi's format). The graph is refused whole, before any model
is opened or any folder made."""


from __future__ import annotations

from pathlib import Path

from .catalogue import Models, Scenario, case, run

GRAPH_HINT = "a stage can only use stages that do not use it, directly or through others"
NAME_HINT = "a stage is written to a folder of its name: use letters, digits, '.', '_' and '-' (e.g. name: stage-1)"


def stages_case(tmp: Path, *documents: str) -> tuple[list[str], Path]:
    path = tmp / "multi.yml"
    path.write_text("\n---\n".join(documents) + "\n")
    return run(tmp, path), path


def stage(name: str | None, *models: str) -> str:
    head = f"name: {name}\n" if name is not None else ""
    return head + "merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models)


@case("stages")
def stages_cycle(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage("a", "b", str(models.a)), stage("b", "a"), stage(None, "b"))
    return Scenario(args, 2, f"error: {path} (document 1): models[0].model: the stages form a cycle: a -> b -> a\n"
                             f"Hint: {GRAPH_HINT}\n", out=tmp / "out")


@case("stages")
def stages_missing_stage(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage("first", str(models.a), str(models.b)), stage(None, "frist", str(models.b)))
    return Scenario(args, 2, f"error: {path} (document 2): models[0].model: 'frist' is neither a stage of this file "
                             "nor a local folder. Did you mean 'first'?\nHint: name a stage (name: ...) of this file, "
                             "a local model folder or a Hub repo (org/name)\n", out=tmp / "out")


@case("stages")
def stages_duplicate_name(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage("a", str(models.a)), stage("a", str(models.b)), stage(None, "a"))
    return Scenario(args, 2, f"error: {path} (document 2): name: stage name 'a' is also the name of document 1\n"
                             "Hint: give every stage of a multi-stage file its own name\n", out=tmp / "out")


@case("stages")
def stages_two_finals(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage(None, str(models.a)), stage("a", str(models.b)), stage(None, "a"))
    return Scenario(args, 2, f"error: {path} (document 3): this document has no name, and neither has document 1: "
                             "only the final stage has none\nHint: give each intermediate stage a name (name: ...); "
                             "the one without is written to OUT\n", out=tmp / "out")


@case("stages")
def stages_name_is_a_path_traversal(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage("../x", str(models.a)), stage(None, "../x"))
    return Scenario(args, 2, f"error: {path} (document 1): name: stage name '../x' is not a plain folder name\n"
                             f"Hint: {NAME_HINT}\n", out=tmp / "out")


@case("stages")
def stages_name_is_not_a_string(tmp: Path, models: Models) -> Scenario:
    args, path = stages_case(tmp, stage("[7]", str(models.a)), stage(None, str(models.b)))
    return Scenario(args, 2, f"error: {path} (document 1): name: a stage name must be a string, got list [7]\n"
                             "Hint: write it as a string, e.g. name: \"stage-1\"; leave name out for the final stage\n",
                    out=tmp / "out")


@case("stages")
def stages_moe_file_given_to_run(tmp: Path, models: Models) -> Scenario:
    path = tmp / "moe.yml"
    path.write_text(f"base_model: {models.a}\ngate_mode: random\nexperts:\n  - source_model: {models.b}\n")
    return Scenario(run(tmp, path), 2, f"error: {path}: this is a mergekit-moe file: run `merge moe {path} -o OUT`\n",
                    out=tmp / "out")
