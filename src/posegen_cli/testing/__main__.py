"""``python -m posegen_cli.testing make-tiny-models DIR``: a random model set for offline end-to-end runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from posegen_cli.testing import make_tiny_models

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Helpers for testing a posegen install without real weights.")


@app.callback()
def main() -> None:
    """Testing helpers."""


@app.command("make-tiny-models")
def make_tiny_models_command(
    directory: Annotated[Path, typer.Argument(help="Folder to write wan-i2v-720p/ and posegen/ into (use it as --models-dir).")],
) -> None:
    """Write tiny random models in the real download layout; then `posegen animate ... --models-dir DIR --device cpu`."""
    root = make_tiny_models(directory)
    typer.echo(f"wrote tiny models to {root}; run: posegen animate PHOTO VIDEO --models-dir {root} --device cpu")


if __name__ == "__main__":
    app()
