"""`perceiver checkpoints`: the checkpoints found on the search path (PERCEIVER_CHECKPOINTS, then shipped)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .. import runner
from .errors import report_errors
from .options import Json


def register(parent: typer.Typer) -> None:
    parent.command("checkpoints")(checkpoints)


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _heldout(value: dict | None) -> str:
    if not value or "value" not in value:
        return ""
    number = value["value"]
    shown = f"{number:.3g}" if isinstance(number, int | float) else str(number)
    return f"{shown} {value.get('metric', '')}".strip()


@report_errors
def checkpoints(
    as_json: Json = False,
    show_path: Annotated[bool, typer.Option("--path", help="Add a column with each checkpoint's folder.")] = False,
) -> None:
    """List checkpoints: name, modality, parameters, context, latents, training data and held-out metric."""
    rows = runner.describe_checkpoints()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print("no checkpoints found (set PERCEIVER_CHECKPOINTS to a folder of checkpoints)")
        return
    table = Table(show_lines=False)
    for column, justify in (
        ("name", "left"),
        ("modality", "left"),
        ("parameters", "right"),
        ("context", "right"),
        ("latents", "right"),
        ("data", "left"),
        ("held-out", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column == "name")
    if show_path:
        table.add_column("path", overflow="fold")
    for row in rows:
        if "error" in row:
            cells = [row["name"], f"[red]unreadable: {row['error']}[/red]", "", "", "", "", ""]
        else:
            cells = [
                row["name"],
                str(row["modality"]),
                _count(row["parameters"]),
                str(row["context"] or "?"),
                str(row["latents"] or "?"),
                row["data"] or "",
                _heldout(row["heldout"]),
            ]
        table.add_row(*cells, *([row["path"]] if show_path else []))
    console.print(table)
