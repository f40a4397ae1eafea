"""Text data and sentence-similarity evaluation for encoders (numpy and scipy; no torch).

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
from .files import is_text_file, read_sentences
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
    "Lee50",
    "SimilarityScores",
    "WordPairs",
    "calibration_sentences",
    "cosine_agreement",
    "gensim_test_data",
    "heldout_sentences",
    "is_text_file",
    "lee50_spearman",
    "read_lee50",
    "read_sentences",
    "read_word_pairs",
    "similarity_scores",
    "word_pairs_spearman",
]
