"""`lowbit eval MODEL --text FILE [--window 512]`: perplexity of a decoder LLM on a UTF-8 text, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ...text.perplexity import DEFAULT_WINDOW
from ..options import user_errors


@click.command("eval")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path),
              help="UTF-8 text file, read whole and tokenized as one sequence.")
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True,
              help="Tokens per non-overlapping window; each window scores its tokens 2..n.")
@click.option("--max-windows", type=int, default=None,
              help="Score only the first N windows (a quick estimate on a long text).")
@user_errors
def eval_command(model: str, text_path: Path, window: int, max_windows: int | None) -> None:
    """Perplexity of MODEL (zoo:smollm2_135m or a Llama .gguf file in float32, or a decoder artifact DIR from
    `lowbit quantize`) on a text file; progress on stderr,
    JSON (perplexity, 95% bootstrap interval over windows, tokens, windows) on stdout."""
    from ...pipeline.perplexity_eval import text_perplexity

    result = text_perplexity(model, text_path, window, max_windows)
    click.echo(json.dumps(result.as_dict(), indent=2))
