"""A user's text file, UTF-8: one sentence per line (calibration and held-out text, `lowbit embed --text`), or
running text (`lowbit eval --text`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError

TEXT_SUFFIXES = (".txt",)


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def _read_utf8(path: Path, what: str, form: str) -> str:
    """The whole of `path` as UTF-8 text; a LowbitError naming the file for a folder, a missing, unreadable or
    non-UTF-8 file, or NUL bytes. `form` says what the text should be, for the messages."""
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"{path}: is a folder; {what} text is {form}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LowbitError(f"{path}: no such file ({what} text is {form})") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read the {what} text: {e}") from e
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the first line
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} text as UTF-8") from None
    if "\x00" in text:
        raise LowbitError(f"{path}: holds NUL bytes, so it is not a text file; {what} text is {form}")
    return text


def read_sentences(path: Path, what: str, keep_blank: bool = False) -> list[str]:
    """The lines of `path`, stripped; blank lines are dropped unless `keep_blank` (then line i is sentence i).

    A missing, unreadable, non-UTF-8 or sentence-less file is a LowbitError naming it and the fix.
    """
    form = "a .txt file with one sentence per line"
    lines = [line.strip() for line in _read_utf8(path, what, form).splitlines()]
    sentences = lines if keep_blank else [line for line in lines if line]
    if not any(sentences):
        raise LowbitError(f"{path}: no sentences (the file is empty or blank); give {what} text with one sentence "
                          "per line")
    return sentences


def read_text(path: Path, what: str) -> str:
    """The whole of a UTF-8 text file, as is (running text for perplexity); an empty or blank file is an error."""
    text = _read_utf8(path, what, "a UTF-8 text file")
    if not text.strip():
        raise LowbitError(f"{path}: the {what} text is empty or blank; give a UTF-8 text file with some text")
    return text
