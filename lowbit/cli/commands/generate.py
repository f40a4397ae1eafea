"""`lowbit generate DIR --prompt TEXT`: stream a decoder artifact's continuation, then its speed on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ...runtime.decoder import BACKENDS
from ..options import user_errors


@click.command("generate")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The text to continue (used as is: no chat template is applied).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0: greedy; otherwise sample from softmax(logits / temperature).")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True,
              help="Sample only from the smallest set of tokens whose probability reaches this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sampling.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="tvm: the artifact's compiled kernels; numpy: float32 weights dequantized at load; auto: tvm "
                   "where the artifact has them and TVM is installed.")
@user_errors
def generate_command(directory: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, backend: str) -> None:
    """Continue PROMPT with the decoder artifact DIR (from `lowbit quantize zoo:smollm2_135m`), streaming the text
    to stdout; prompt tokens, prefill time and decode tokens/s go to stderr."""
    from ...runtime.decoder import DecoderModel

    model = DecoderModel(directory, backend)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    how = ("TVM kernels, int4 weights" if model.backend == "tvm" else "numpy, float32 weights dequantized at load")
    result = model.generate(prompt, max_new_tokens, temperature, top_p, seed, stream=show)
    sys.stdout.write("\n")
    click.echo(f"{result.prompt_tokens} prompt tokens, prefill {result.prefill_s * 1e3:.0f} ms; "
               f"{len(result.token_ids)} new tokens, {result.tokens_per_s:.1f} tokens/s ({how})", err=True)
