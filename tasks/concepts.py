"""Stage `concepts`: the object and attribute vocabulary of the filtered captions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diht_core.concepts import build_vocabulary

from ._stage import cli, make_task


def body(p, run) -> dict:
    data = Path(p.paths.data)
    df = pd.read_parquet(data / "cat" / "decisions.parquet")
    kept = df[df.kept]
    if kept.empty:
        raise ValueError("the CAT filter kept no pairs: loosen cat_filter params")
    vocab = build_vocabulary(kept.objects.map(list), kept.attributes.map(list), p.concepts.min_count,
                             p.concepts.max_size)
    for kind in ("objects", "attributes"):
        if not vocab[kind]:
            raise ValueError(f"the {kind} vocabulary is empty: lower concepts.min_count "
                             f"(now {p.concepts.min_count}) or keep more pairs in cat_filter")
    out = data / "concepts" / "vocab.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(vocab, indent=1) + "\n")
    run.log_artifact(out)
    return {
        "captions": len(kept),
        "n_objects": len(vocab["objects"]),
        "n_attributes": len(vocab["attributes"]),
        "top_objects": list(vocab["objects"])[:10],
        "top_attributes": list(vocab["attributes"])[:10],
    }


concepts = make_task("concepts", body)

if __name__ == "__main__":
    cli("concepts", body)
