"""Document features for clustering: tf-idf, a truncated SVD, L2 normalisation.

What c-BTM's clusterer does with scikit-learn (`TfidfVectorizer` -> `TruncatedSVD` ->
`Normalizer`), in numpy: scikit-learn is not a dependency of the core install (a 9 MB
wheel plus joblib/threadpoolctl for ~80 lines of arithmetic), and these few formulas
are easier to keep deterministic and to store as plain arrays.

* terms: lower-cased words of two or more word characters (`\\b\\w\\w+\\b`, as
  TfidfVectorizer's default token pattern); the vocabulary is the `max_features` terms
  most frequent over the fitting documents (ties: alphabetical);
* tf-idf: raw term counts times the smoothed idf `ln((1 + n) / (1 + df)) + 1`, each row
  L2-normalised (TfidfVectorizer's defaults);
* SVD: the top `svd_dims` right singular vectors of the fitted tf-idf matrix, by a
  seeded randomised range finder (Halko et al.; 4 power iterations), signs fixed so
  each vector's largest entry is positive; rows are projected and L2-normalised again
  (an empty or out-of-vocabulary text maps to the zero vector).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")
_POWER_ITERATIONS = 4
_OVERSAMPLE = 10


def terms(text: str) -> list[str]:
    """The text's terms, in order (lower-cased words of >= 2 word characters)."""
    return TOKEN_PATTERN.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class TfidfFeatures:
    """A fitted featuriser.

    Attributes:
      vocabulary: `[V]` terms; column j of the tf-idf matrix counts `vocabulary[j]`.
      idf: `[V] float32` smoothed inverse document frequencies.
      components: `[V, D] float32` SVD projection (orthonormal columns).
    """

    vocabulary: tuple[str, ...]
    idf: np.ndarray
    components: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    def tfidf(self, texts: Sequence[str]) -> np.ndarray:
        """`[N, V] float32` L2-normalised tf-idf rows (zero for a text without known terms)."""
        index = {t: j for j, t in enumerate(self.vocabulary)}
        counts = np.zeros((len(texts), len(self.vocabulary)), np.float32)
        for i, text in enumerate(texts):
            for term, c in Counter(terms(text)).items():
                j = index.get(term)
                if j is not None:
                    counts[i, j] = c
        return _l2_rows(counts * self.idf[None, :])

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """`[N, D] float32` the texts' features (unit rows, or zero rows)."""
        return _l2_rows(self.tfidf(texts) @ self.components)

    def save(self, path: Path) -> None:
        """To an `.npz` (no pickles: the vocabulary is a unicode array)."""
        with open(path, "wb") as f:
            np.savez(f, vocabulary=np.array(self.vocabulary, dtype=np.str_), idf=self.idf,
                     components=self.components)

    @classmethod
    def load(cls, path: Path) -> TfidfFeatures:
        with np.load(path, allow_pickle=False) as z:
            return cls(vocabulary=tuple(str(t) for t in z["vocabulary"]),
                       idf=z["idf"].astype(np.float32),
                       components=z["components"].astype(np.float32))


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-30), 0.0).astype(np.float32)


def fit_tfidf(texts: Sequence[str], *, max_features: int, svd_dims: int,
              seed: int) -> TfidfFeatures:
    """Fits vocabulary, idf and the SVD projection on `texts` (see the module docstring)."""
    if max_features < 1:
        raise ValueError(f"--max_features must be >= 1, got {max_features}")
    if svd_dims < 1:
        raise ValueError(f"--svd_dims must be >= 1, got {svd_dims}")
    if not texts:
        raise ValueError("no documents to fit the tf-idf features on")
    total: Counter[str] = Counter()
    df: Counter[str] = Counter()
    for text in texts:
        counts = Counter(terms(text))
        total.update(counts)
        df.update(counts.keys())
    if not total:
        raise ValueError("the documents hold no terms (words of >= 2 word characters)")
    ranked = sorted(total, key=lambda t: (-total[t], t))[:max_features]
    vocabulary = tuple(sorted(ranked))
    n = len(texts)
    idf = np.array([np.log((1 + n) / (1 + df[t])) + 1.0 for t in vocabulary], np.float32)
    dims = min(svd_dims, len(vocabulary), n)
    unprojected = TfidfFeatures(vocabulary, idf, np.eye(len(vocabulary), dtype=np.float32))
    components = _top_right_singular_vectors(unprojected.tfidf(texts), dims, seed)
    return TfidfFeatures(vocabulary, idf, components)


def _top_right_singular_vectors(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """`[V, dims]` the top right singular vectors of `x [N, V]` (randomised, seeded)."""
    x = x.astype(np.float64)
    rank = min(dims + _OVERSAMPLE, *x.shape)
    omega = np.random.default_rng(seed).standard_normal((x.shape[1], rank))
    q, _ = np.linalg.qr(x @ omega)
    for _ in range(_POWER_ITERATIONS):
        q, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ q)
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    v = vt[:dims].T
    signs = np.sign(v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])])
    return (v * np.where(signs == 0, 1.0, signs)).astype(np.float32)
