"""`lowbit eval`: the perplexity of a decoder LLM on a user's UTF-8 text.

MODEL is zoo:NAME, a .gguf file (float32), or a weight-quantized decoder artifact (its dequantized weights).

The text is read whole and tokenized as one sequence (no BOS unless the GGUF asks for one), then scored in
non-overlapping windows (`lowbit.text.perplexity`). Cheap checks come first: a bad text or window fails before
the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.llama import decoder_logits_fn
from ..text.files import read_text
from ..text.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity, window_bounds
from .decoder import load_decoder
from .progress import Progress


@dataclass(frozen=True)
class TextPerplexity:
    """A `PerplexityResult` with what it was measured on."""

    model: str
    text: str
    text_tokens: int
    result: PerplexityResult

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "text": self.text, "text_tokens": self.text_tokens, **self.result.as_dict()}


def text_perplexity(model: str, text_path: Path | str, window: int = DEFAULT_WINDOW,
                    max_windows: int | None = None, progress: Progress | None = None) -> TextPerplexity:
    """Perplexity of `model` on the text file, in windows of `window` tokens (the first `max_windows` only if
    given); progress lines go to `progress` (default: stderr)."""
    progress = progress or Progress()
    window_bounds(0, window, max_windows)  # validates window and max_windows before anything is loaded
    text = read_text(Path(text_path), "evaluation")
    with progress.stage("load"):
        progress.echo("load", f"loading {model}")
        loaded = load_decoder(model)
    ids = loaded.tokenizer.encode(text)
    n_windows = len(window_bounds(len(ids), window, max_windows))
    progress.echo("perplexity", f"{len(ids)} tokens of {text_path}: {n_windows} window(s) of up to {window}")
    with progress.stage("perplexity"), progress.steps_of("perplexity") as log:
        result = perplexity(decoder_logits_fn(loaded.model), ids, window, max_windows, log=log)
    return TextPerplexity(model, str(text_path), len(ids), result)
