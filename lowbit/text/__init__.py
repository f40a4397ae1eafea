"""Text data, sentence-similarity evaluation for encoders and perplexity for decoders (numpy and scipy; no torch).

The tokenizer lives in `lowbit.runtime.tokenizer`, as the runtime needs it too.
"""

from .corpora import (
    Lee50,
    WordPairs,
    calibration_sentences,
    gensim_test_data,
    heldout_sentences,
    read_lee50,
    read_word_pairs,
)
from .files import is_text_file, read_sentences, read_text
from .long_texts import EVALUATION_TEXTS, decoder_calibration_text, enwiki_text, lee_text, strip_wiki_markup
from .perplexity import PerplexityResult, perplexity
from .similarity import (
    CosineAgreement,
    SimilarityScores,
    cosine_agreement,
    lee50_spearman,
    similarity_scores,
    word_pairs_spearman,
)

__all__ = [
    "CosineAgreement",
    "EVALUATION_TEXTS",
    "Lee50",
    "PerplexityResult",
    "SimilarityScores",
    "WordPairs",
    "calibration_sentences",
    "cosine_agreement",
    "decoder_calibration_text",
    "enwiki_text",
    "gensim_test_data",
    "heldout_sentences",
    "is_text_file",
    "lee50_spearman",
    "lee_text",
    "perplexity",
    "read_lee50",
    "read_sentences",
    "read_text",
    "read_word_pairs",
    "similarity_scores",
    "strip_wiki_markup",
    "word_pairs_spearman",
]
