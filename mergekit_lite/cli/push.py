"""``merge push OUT --repo org/name``: publish a merged model to the Hugging Face Hub."""

from __future__ import annotations

import click

from .common import common_options


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", required=True, metavar="ORG/NAME", help="The Hub repo (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing). Default: main.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="Default: 'Upload merged model (METHOD, N models)'.")
@click.option("--license", "license_id", default=None, metavar="ID",
              help="The license the Hub shows (apache-2.0, mit, llama3.1, ...), written into the card as sent.")
@click.option("--base-model", "base_models", multiple=True, metavar="ORG/NAME",
              help="A Hub model this merge comes from (repeatable): for merges of local folders, so the Hub's "
                   "model tree links the result. Written into the card as sent.")
@click.option("--token", default=None, envvar=None, help="A Hub token to use instead of HF_TOKEN or the stored one "
                                                        "(never printed or saved).")
@click.option("--dry-run", is_flag=True, help="Show what would be sent and check the card; make no request.")
@common_options
def push(out: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, commit_message: str | None,
         license_id: str | None, base_models: tuple[str, ...], token: str | None, dry_run: bool,
         quiet: bool) -> None:
    """Upload the merged model in OUT to the Hugging Face Hub.

    Only the model's files are sent, by their exact names: *.safetensors and their index, config.json,
    generation_config.json, the tokenizer's files, README.md (the model card), mergekit_config.yml and
    merge_run.json. A link or a special file among them, a file holding a secret (a token, a private key, a
    cloud key) or weights that are not safetensors stop the push, naming the file. The token comes from
    HF_TOKEN or `hf auth login`, and is never printed.
    """
    from ..hub.push import push_to_hub
    from ..hub.push_plan import plan_push

    if dry_run:
        plan = plan_push(out, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token, license=license_id, base_models=base_models)
        click.echo(plan.summary())
        if plan.problems:
            raise plan.problems[0]
        return
    result = push_to_hub(out, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, progress=not quiet, token=token, license=license_id,
                         base_models=base_models)
    if not quiet:
        click.echo(str(result))
