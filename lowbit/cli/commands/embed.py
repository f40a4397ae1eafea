"""`lowbit embed DIR --text FILE -o emb.npy`: sentence embeddings from a compiled text model, one row per line."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...io import atomic_file
from ..options import user_errors


@click.command("embed")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="UTF-8 text, one sentence per line; row i of the output is line i (a blank line is embedded as "
                   "empty text).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the embeddings: a .npy of float32 [lines, hidden], written atomically.")
@user_errors
def embed_command(directory: Path, text_path: Path, output: Path) -> None:
    """Embed each line of a text file with the compiled text model in DIRECTORY (no torch needed)."""
    from ...runtime import load
    from ...text.files import read_sentences

    sentences = read_sentences(text_path, "input", keep_blank=True)  # before the model: bad text fails fast
    model = load(directory)
    warnings: list[str] = []
    embeddings = model.encode(sentences, warn=warnings.append)
    for message in warnings:
        click.echo(f"warning: {text_path}: {message}", err=True)
    with atomic_file(output, "wb") as f:
        np.save(f, embeddings)
    blank = sum(not s for s in sentences)
    note = f" ({blank} blank line{'s' if blank != 1 else ''} embedded as empty text)" if blank else ""
    click.echo(f"{len(sentences)} sentences{note}: embeddings {embeddings.shape} {embeddings.dtype}; wrote {output}")
