"""Lexical retrieval over token ids: which stored text is nearest a query, for the methods that
pick a stored fact or demonstration by its text (IKE's demonstrations and facts, LTE's facts).

`LexicalIndex` holds idf-weighted bag-of-tokens vectors of its documents (token ids of the
model's own tokenizer: no sentence-embedding weights are needed) and compares a query with each
by cosine similarity.

Example:
    >>> index = LexicalIndex([[5, 6, 7], [8, 9]])
    >>> index.scores([5, 6])     # [cosine with document 0, cosine with document 1]
    >>> index.nearest([5, 6], 1)
    [0]
"""

from __future__ import annotations

import math
from collections import Counter


class LexicalIndex:
    """Idf-weighted bag-of-tokens vectors of documents, compared by cosine.

    A token's idf is log((n + 1) / (df + 1)) + 1 over the n documents (df: how many hold it);
    a query token no document holds weighs 1 (it only lowers every score alike).

    Args:
        documents: token ids of each document.
    """

    def __init__(self, documents: list[list[int]]):
        self.documents = documents
        frequency = Counter(token for doc in documents for token in set(doc))
        n = len(documents)
        self.idf = {token: math.log((n + 1) / (df + 1)) + 1.0 for token, df in frequency.items()}
        self.vectors = [self.vector(doc) for doc in documents]

    def __len__(self) -> int:
        return len(self.documents)

    def vector(self, tokens: list[int]) -> dict[int, float]:
        """The unit-norm idf-weighted count vector of `tokens` ({token: weight})."""
        counts = Counter(tokens)
        weights = {t: c * self.idf.get(t, 1.0) for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {t: w / norm for t, w in weights.items()}

    def scores(self, tokens: list[int]) -> list[float]:
        """The cosine similarity (0..1) of `tokens` with each document, in document order."""
        query = self.vector(tokens)
        return [sum(w * vec.get(t, 0.0) for t, w in query.items()) for vec in self.vectors]

    def nearest(self, tokens: list[int], k: int) -> list[int]:
        """Indices of the `k` documents nearest `tokens`, nearest first (ties: lower index)."""
        scores = self.scores(tokens)
        return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]

    def best(self, tokens: list[int]) -> tuple[int, float]:
        """(index, score) of the document nearest `tokens` (ties: lower index).

        Raises:
            ValueError: the index holds no document.
        """
        if not self.documents:
            raise ValueError("LexicalIndex.best: the index holds no document")
        scores = self.scores(tokens)
        j = min(range(len(scores)), key=lambda i: (-scores[i], i))
        return j, scores[j]
