"""Pseudo-labelling: the concept classifiers' top-k predictions on every cached teacher-feature shard, and how
many of the caption's own concepts they cover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import PseudoLabelParams
from ..data.pseudo_labels import save_shard, sparsify


def write_pseudo_labels(pl: PseudoLabelParams, heads: dict, names: dict, feature_dir: Path, decisions,
                        out: Path) -> dict:
    """One pseudo-label shard in out per feature shard of feature_dir (earlier ones removed); the caption
    concepts come from the CAT decisions table (indexed by key). Returns the stage metrics."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npz"):
        old.unlink()
    n, total_bytes, hits_all, hits_any, with_concepts = 0, 0, 0, 0, 0
    for f in sorted(feature_dir.glob("*.npz")):
        z = np.load(f)
        keys = z["keys"].tolist()
        feats = torch.from_numpy(z["features"].astype(np.float32))
        sparse = {}
        with torch.no_grad():
            for kind, lin in heads.items():
                sparse[kind] = sparsify(torch.softmax(lin(feats), dim=-1), pl.top_k)
        save_shard(out / f"{f.stem}.npz", keys, sparse["objects"], sparse["attributes"])
        n += len(keys)
        total_bytes += sum(a.nbytes for pair in sparse.values() for a in pair)
        for kind in ("objects", "attributes"):
            index = {c: i for i, c in enumerate(names[kind])}
            for row, key in enumerate(keys):
                wanted = {index[c] for c in decisions.at[key, kind] if c in index}
                if not wanted:
                    continue
                top = set(sparse[kind][0][row].tolist())
                with_concepts += 1
                hits_all += wanted <= top
                hits_any += bool(wanted & top)
    return {
        "samples": n,
        "top_k": pl.top_k,
        "bytes_per_sample": total_bytes / max(1, n),
        "caption_concepts_all_in_topk": hits_all / max(1, with_concepts),
        "caption_concepts_any_in_topk": hits_any / max(1, with_concepts),
    }
