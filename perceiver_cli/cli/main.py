"""The `perceiver` application: registers one small module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__

app = typer.Typer(
    name="perceiver",
    help="Generate music, images and long text with Perceiver AR; train and evaluate your own models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"perceiver {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Perceiver AR: long-context autoregressive generation."""


COMMAND_MODULES = ("generate", "codec", "train", "checkpoints", "bench")


def _register() -> None:
    # imported here so that `perceiver --version` stays fast and each group stays in its own file
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(app)


def main() -> None:
    _register()
    app()
