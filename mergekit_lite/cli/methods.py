"""``merge methods [NAME]``: the strategies and their parameters, from their declarations."""

from __future__ import annotations

import click

from .common import common_options


@click.command()
@click.argument("name", required=False)
@common_options
def methods(name: str | None, quiet: bool) -> None:
    """List the merge methods, or describe one in detail."""
    from ..plan.describe import describe_strategies, describe_strategy
    from ..strategies.registry import all_strategies, get_strategy

    if name:
        click.echo(describe_strategy(get_strategy(name, where="NAME")))
    else:
        click.echo(describe_strategies(list(all_strategies().values())))
