"""Running text for decoders: evaluation texts for perplexity and a disjoint calibration text.

All from the gensim 4.4.0 wheel's test data (read as files; gensim is never imported). Documents are joined with a
blank line ("\\n\\n") into one text, which is tokenized as one sequence without a BOS token (SmolLM2's GGUF sets
add_bos_token false), then cut into perplexity windows.

Evaluation:
- ``lee``: the 300 news documents of ``lee_background.cor``, in file order.
- ``enwiki``: the articles of ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (a MediaWiki
  XML dump), main namespace only, redirects dropped, in file order; `strip_wiki_markup` turns each into plain text.

Calibration (never evaluated on): the 50 news documents of ``lee.cor`` (none of them is in lee_background.cor;
tests/test_long_texts.py checks) and the 200 movie-review sentences of ``pang_lee_polarity.cor`` (another source).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from functools import lru_cache

from ..errors import LowbitError
from .corpora import GENSIM_VERSION, background_documents, gensim_test_data, heldout_sentences, read_lee50

ENWIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DOCUMENT_SEPARATOR = "\n\n"
# Sections that are lists of citations and links rather than prose; an article is cut at the first of them.
_TRAILING_SECTIONS = ("references", "external links", "see also", "further reading", "notes", "bibliography",
                      "sources", "footnotes", "citations")
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_ELEMENTS = re.compile(r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source)[^>]*>.*?</\1>",
                            re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost template; removed until none is left
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost table
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost internal link
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s([^\]]*))?\]")
_TAG = re.compile(r"<[^>]+>")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")


def _repeat(pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], text: str) -> str:
    while True:  # innermost first, so nested templates/tables/links go one level per pass
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(_DROP_LINK_PREFIXES) or _INTERLANGUAGE.match(lowered):
        return ""  # images (with their captions), categories, interlanguage links
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup, reasonably (not a full parser).

    Dropped: comments, <ref> footnotes, templates ({{...}}, nested: infoboxes, citations), tables ({|...|}),
    math/gallery blocks, images and categories, interlanguage links, HTML tags, and everything from the first
    References/External links/See also-like heading on. Kept: link text ([[a|b]] -> b, [[a]] -> a, [url text] ->
    text), heading titles as their own line, list items without their markers. HTML entities are decoded; runs
    of blank lines become one.
    """
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_LINK, _link_text, text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in _TRAILING_SECTIONS:
                break
            line = heading.group(2)
        elif line.startswith(("|", "!", "{|", "|}", "__")):
            continue  # leftovers of broken tables, magic words (__TOC__)
        else:
            line = line.lstrip("*#:; ").strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@lru_cache(maxsize=1)
def enwiki_articles() -> tuple[str, ...]:
    """Plain text of each main-namespace, non-redirect article of the enwiki sample, in file order."""
    path = gensim_test_data() / ENWIKI_SAMPLE
    articles = []
    try:
        with bz2.open(path, "rb") as f:
            for _, element in ET.iterparse(f):
                if _local(element.tag) != "page":
                    continue
                fields = {_local(child.tag): child for child in element.iter()}
                namespace, body = fields.get("ns"), fields.get("text")
                wikitext = body.text if body is not None and body.text else ""
                is_article = namespace is not None and namespace.text == "0" and "redirect" not in fields
                if is_article and not wikitext.lstrip().upper().startswith("#REDIRECT"):
                    article = strip_wiki_markup(wikitext)
                    if article:
                        articles.append(article)
                element.clear()
    except FileNotFoundError:
        raise LowbitError(f"{path}: missing; reinstall gensim {GENSIM_VERSION} (pip install --no-deps "
                          f"gensim=={GENSIM_VERSION} --force-reinstall)") from None
    except (OSError, EOFError, ET.ParseError) as e:
        raise LowbitError(f"{path}: cannot read it as bz2-compressed MediaWiki XML ({e}); is it the file gensim "
                          f"{GENSIM_VERSION} ships?") from e
    if not articles:
        raise LowbitError(f"{path}: no articles found")
    return tuple(articles)


def lee_text() -> str:
    """Evaluation text: the 300 lee_background.cor news documents, blank-line separated."""
    return DOCUMENT_SEPARATOR.join(background_documents())


def enwiki_text() -> str:
    """Evaluation text: the enwiki sample's articles as plain text, blank-line separated."""
    return DOCUMENT_SEPARATOR.join(enwiki_articles())


EVALUATION_TEXTS: dict[str, Callable[[], str]] = {"lee": lee_text, "enwiki": enwiki_text}


def decoder_calibration_documents() -> list[str]:
    """Calibration documents for a decoder: the 50 lee.cor news documents, then the 200 movie-review sentences."""
    return [*read_lee50().documents, *heldout_sentences()]


def decoder_calibration_text() -> str:
    """The calibration documents joined as the evaluation texts are (blank-line separated)."""
    return DOCUMENT_SEPARATOR.join(decoder_calibration_documents())

