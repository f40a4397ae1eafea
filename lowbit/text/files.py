"""A user's text file: one sentence per line, UTF-8 (calibration and held-out text, `lowbit embed --text`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError

TEXT_SUFFIXES = (".txt",)


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def read_sentences(path: Path, what: str, keep_blank: bool = False) -> list[str]:
    """The lines of `path`, stripped; blank lines are dropped unless `keep_blank` (then line i is sentence i).

    A missing, unreadable, non-UTF-8 or sentence-less file is a LowbitError naming it and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise LowbitError(f"{path}: is a folder; {what} text is a .txt file with one sentence per line")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LowbitError(f"{path}: no such file ({what} text is a .txt file with one sentence per line)") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read the {what} text: {e}") from e
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the first line
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} text as UTF-8, one sentence "
                          "per line") from None
    if "\x00" in text:
        raise LowbitError(f"{path}: holds NUL bytes, so it is not a text file; {what} text is one sentence per line")
    lines = [line.strip() for line in text.splitlines()]
    sentences = lines if keep_blank else [line for line in lines if line]
    if not any(sentences):
        raise LowbitError(f"{path}: no sentences (the file is empty or blank); give {what} text with one sentence "
                          "per line")
    return sentences
