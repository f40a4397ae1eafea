"""Decoder texts: the wiki markup stripper, the enwiki and Lee evaluation texts, and a calibration text disjoint
from both."""

from __future__ import annotations

import re

from lowbit.text.corpora import background_documents, heldout_sentences, read_lee50
from lowbit.text.long_texts import (
    DOCUMENT_SEPARATOR,
    decoder_calibration_documents,
    decoder_calibration_text,
    enwiki_articles,
    enwiki_text,
    lee_text,
    strip_wiki_markup,
)


def test_strip_wiki_markup() -> None:
    wikitext = """{{Infobox country|name=X|capital={{nowrap|Y Z}}}}
'''Albania''' is a [[country]] in [[Southeast Europe|southeastern Europe]].<ref name="a">{{cite web|url=x}}</ref>
It borders [[Greece]]<ref>Book, p. 3</ref> and the sea.<!-- hidden note -->
[[File:Flag.svg|thumb|The [[flag]] of Albania]]
{| class="wikitable"
|-
| cell || {{flagicon|ALB}} cell
|}
== History ==
* First item with [http://example.org a link] and &nbsp;an&nbsp;entity &amp; more.
# Second item<br />
<math>x^2</math>
[[Category:Countries]]
[[de:Albanien]]

== References ==
{{reflist}}
Something after the references.
"""
    text = strip_wiki_markup(wikitext)
    assert text == ("Albania is a country in southeastern Europe.\nIt borders Greece and the sea.\n\nHistory\n"
                    "First item with a link and  an entity & more.\nSecond item")


def test_enwiki_articles_are_plain_text() -> None:
    articles = enwiki_articles()
    assert len(articles) > 90  # 206 pages: 100 redirects, a few outside the main namespace
    assert articles[0].startswith("Anarchism is a political philosophy")
    text = enwiki_text()
    assert text == DOCUMENT_SEPARATOR.join(articles)
    leftovers = {pattern: len(re.findall(pattern, text)) for pattern in (r"\{\{", r"\[\[", r"<ref", r"\{\|", "'''")}
    # A handful survive in 2.7M characters: the ASCII article's template listing the printable characters
    # (literal braces inside) and two image captions holding brackets.
    assert all(n <= 3 for n in leftovers.values()), leftovers
    assert len(text) > 2_000_000


def test_calibration_text_is_disjoint_from_evaluation_texts() -> None:
    calibration = decoder_calibration_documents()
    assert calibration == [*read_lee50().documents, *heldout_sentences()]
    assert decoder_calibration_text() == DOCUMENT_SEPARATOR.join(calibration)
    assert len(background_documents()) == 300 and lee_text().count(DOCUMENT_SEPARATOR) == 299
    evaluation = lee_text() + enwiki_text()
    # No calibration document, nor any of its long sentences, appears in an evaluation text.
    pieces = [s for doc in calibration for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 8]
    assert len(pieces) > 200
    assert [p for p in pieces if p in evaluation] == []
