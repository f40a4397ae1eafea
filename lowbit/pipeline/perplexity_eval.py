"""`lowbit eval`: the perplexity of a decoder LLM (zoo:NAME or a .gguf file, in float32) on a user's UTF-8 text.

The text is read whole and tokenized as one sequence (no BOS unless the GGUF asks for one), then scored in
non-overlapping windows (`lowbit.text.perplexity`). Cheap checks come first: a bad text or window fails before
the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..models.llama import LoadedDecoder, decoder_logits_fn, load_llama_gguf
from ..models.zoo import ZOO_PREFIX, get_zoo_entry
from ..text.files import read_text
from ..text.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity, window_bounds
from .progress import Progress

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class TextPerplexity:
    """A `PerplexityResult` with what it was measured on."""

    model: str
    text: str
    text_tokens: int
    result: PerplexityResult

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "text": self.text, "text_tokens": self.text_tokens, **self.result.as_dict()}


def load_decoder(model: str) -> LoadedDecoder:
    """A decoder LLM: ``zoo:NAME`` of a decoder, or a path to a Llama-architecture .gguf file."""
    if model.startswith(ZOO_PREFIX):
        entry = get_zoo_entry(model)
        if entry.decoder is None:
            raise LowbitError(f"{model} is not a decoder LLM; perplexity needs one (zoo:smollm2_135m, or a .gguf "
                              "file)")
        return entry.decoder.load()
    path = Path(model)
    if path.is_dir():
        raise LowbitError(f"{path}: is a folder; give zoo:smollm2_135m or a {GGUF_SUFFIX} file (quantized decoder "
                          "artifacts are not evaluated yet)")
    if path.exists() and path.suffix.lower() != GGUF_SUFFIX:
        raise LowbitError(f"{path}: not a {GGUF_SUFFIX} file; MODEL is zoo:NAME of a decoder or a GGUF checkpoint")
    return load_llama_gguf(path)


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
