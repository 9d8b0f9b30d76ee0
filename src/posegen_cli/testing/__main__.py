"""``python -m posegen_cli.testing make-tiny-models DIR``: a random model set for offline end-to-end runs."""

from __future__ import annotations

import shlex
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
    """Write tiny random models in the real download layout, and print the `posegen animate` command that uses them."""
    root = make_tiny_models(directory)
    typer.echo(f"wrote tiny models to {root}; check the install with (PHOTO: a portrait photo, VIDEO: a driving video):")
    typer.echo(f"  {tiny_animate_command(root)}")


def tiny_animate_command(models_dir: Path, photo: str = "PHOTO", video: str = "VIDEO", output: str = "tiny.mp4") -> str:
    """A complete ``posegen animate`` line for the tiny models: a given prompt (they cannot caption), 2 steps, and a
    small 9:16 size (144x256: multiples of 16 with the model's shape, so no photo is cropped for it)."""
    return (
        f"posegen animate {photo} {video} --models-dir {shlex.quote(str(models_dir))} --device cpu "
        f'--prompt "a person dancing" --resolution 144x256 --steps 2 -o {output}'
    )


if __name__ == "__main__":
    app()
