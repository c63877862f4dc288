"""Concept vocabulary (objects, attributes) from parsed captions, and caption multi-hot targets."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from ..config import ConceptParams


def build_vocabulary(objects: Iterable[Iterable[str]], attributes: Iterable[Iterable[str]],
                     c: ConceptParams = ConceptParams()) -> dict:
    """Count lemmatised concepts (once per caption) and keep the frequent ones (>= c.min_count), most frequent
    first, at most c.max_size of each kind."""
    min_count, max_size = c.min_count, c.max_size
    vocab = {}
    for name, rows in (("objects", objects), ("attributes", attributes)):
        counts = Counter(c for row in rows for c in set(row))
        kept = [(c, n) for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        vocab[name] = dict(kept[:max_size])
    return vocab


def vocabulary_from_decisions(decisions, c: ConceptParams) -> dict:
    """The vocabulary of the captions the CAT filter kept (its decisions table); fails if either part is empty."""
    kept = decisions[decisions.kept]
    if kept.empty:
        raise ValueError("the CAT filter kept no pairs: loosen cat_filter params")
    vocab = build_vocabulary(kept.objects.map(list), kept.attributes.map(list), c)
    for kind in ("objects", "attributes"):
        if not vocab[kind]:
            raise ValueError(f"the {kind} vocabulary is empty: lower concepts.min_count "
                             f"(now {c.min_count}) or keep more pairs in cat_filter")
    return vocab


def multi_hot(rows: Iterable[Iterable[str]], names: list[str]) -> np.ndarray:
    """[N, V] float32 0/1 matrix of which vocabulary concepts each caption mentions."""
    index = {c: i for i, c in enumerate(names)}
    rows = list(rows)
    out = np.zeros((len(rows), len(names)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c in row:
            if c in index:
                out[r, index[c]] = 1.0
    return out


def sqrt_resampling_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights that re-sample low-frequency concepts by the square root of their frequency.

    A concept seen f times is drawn about sqrt(f) times instead of f: each sample gets the
    largest 1/sqrt(f_c) over its concepts (samples without concepts get weight 0).
    """
    if targets.size == 0 or not targets.any():
        raise ValueError("no sample mentions any vocabulary concept: nothing to re-sample")
    freq = targets.sum(0)
    inv = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1)), 0.0)
    w = (targets * inv[None, :]).max(1)
    return w / w.sum()
