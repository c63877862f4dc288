"""Stage `pseudo_labels`: top-k sparsified teacher concept predictions for every training sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diht_core.data.pseudo_labels import save_shard, sparsify

from ._stage import cli, make_task


def body(p, run) -> dict:
    data = Path(p.paths.data)
    classifiers = torch.load(data / "teacher" / "classifiers.pt", map_location="cpu", weights_only=True)
    heads = {}
    for kind in ("objects", "attributes"):
        sd = classifiers[kind]["state_dict"]
        lin = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
        lin.load_state_dict(sd)
        heads[kind] = lin.eval()
    out = data / "pseudo_labels"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npz"):
        old.unlink()
    dec = pd.read_parquet(data / "cat" / "decisions.parquet").set_index("key")
    n, total_bytes, hits_all, hits_any, with_concepts = 0, 0, 0, 0, 0
    for f in sorted((data / "teacher" / "features").glob("*.npz")):
        z = np.load(f)
        keys = z["keys"].tolist()
        feats = torch.from_numpy(z["features"].astype(np.float32))
        sparse = {}
        with torch.no_grad():
            for kind, lin in heads.items():
                sparse[kind] = sparsify(torch.softmax(lin(feats), dim=-1), p.pseudo_labels.top_k)
        path = out / f"{f.stem}.npz"
        save_shard(path, keys, sparse["objects"], sparse["attributes"])
        n += len(keys)
        total_bytes += sum(a.nbytes for pair in sparse.values() for a in pair)
        for kind in ("objects", "attributes"):
            names = classifiers[kind]["names"]
            index = {c: i for i, c in enumerate(names)}
            for row, key in enumerate(keys):
                wanted = {index[c] for c in dec.at[key, kind] if c in index}
                if not wanted:
                    continue
                top = set(sparse[kind][0][row].tolist())
                with_concepts += 1
                hits_all += wanted <= top
                hits_any += bool(wanted & top)
    (out / "vocab_sizes.json").write_text(json.dumps(
        {k: len(classifiers[k]["names"]) for k in ("objects", "attributes")}) + "\n")
    return {
        "samples": n,
        "top_k": p.pseudo_labels.top_k,
        "bytes_per_sample": total_bytes / max(1, n),
        "caption_concepts_all_in_topk": hits_all / max(1, with_concepts),
        "caption_concepts_any_in_topk": hits_any / max(1, with_concepts),
    }


pseudo_labels = make_task("pseudo_labels", body)

if __name__ == "__main__":
    cli("pseudo_labels", body)
