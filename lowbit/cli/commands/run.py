"""`lowbit run DIR --input x.npy [-o y.npy]`: run the compiled model in DIR on an input array."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...errors import LowbitError
from ...io import atomic_file
from ..options import user_errors


def _load_array(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read a float array (.npy, or .npz with one array): {e}") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if len(data.files) != 1:
                raise LowbitError(f"{path}: holds {len(data.files)} arrays ({data.files}); expected one")
            data = data[data.files[0]]
    if not np.all(np.isfinite(data)):
        raise LowbitError(f"{path}: contains NaN or Inf")
    return data


@click.command("run")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Float input, as the model takes it (e.g. (N, 3, 224, 224) preprocessed), .npy or .npz.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the output (.npy).")
@user_errors
def run_command(directory: Path, input_path: Path, output: Path | None) -> None:
    """Run the compiled model in DIRECTORY on an input array."""
    from ...runtime import load
    from ...runtime.text import is_text_model

    model = load(directory)
    if is_text_model(model.inputs):
        raise LowbitError(f"{directory}: a text model (inputs input_ids and attention_mask): embed sentences with "
                          f"`lowbit embed {directory} --text FILE -o emb.npy`, one sentence per line")
    y = model.run(_load_array(input_path))
    if not isinstance(y, np.ndarray):
        raise LowbitError("this model has several outputs; use lowbit.runtime.load(DIR).run() from Python")
    if output is not None:
        with atomic_file(output, "wb") as f:
            np.save(f, y)
    summary = f"output {y.shape} {y.dtype}"
    if y.ndim == 2:
        summary += f"; top-1 per row: {np.argmax(y, axis=1)[:16].tolist()}{' ...' if len(y) > 16 else ''}"
    click.echo(summary + (f"; wrote {output}" if output else ""))
