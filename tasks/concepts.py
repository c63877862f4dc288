"""Stage `concepts`: the object and attribute vocabulary of the filtered captions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diht_core.concepts.vocabulary import vocabulary_from_decisions
from diht_core.data.files import atomic_write_text

from ._stage import cli, make_task


def body(p, run) -> dict:
    data = Path(p.paths.data)
    decisions = pd.read_parquet(data / "cat" / "decisions.parquet")
    vocab = vocabulary_from_decisions(decisions, p.concepts)
    out = data / "concepts" / "vocab.json"
    atomic_write_text(out, json.dumps(vocab, indent=1) + "\n")
    run.log_artifact(out)
    return {
        "captions": int(decisions.kept.sum()),
        "n_objects": len(vocab["objects"]),
        "n_attributes": len(vocab["attributes"]),
        "top_objects": list(vocab["objects"])[:10],
        "top_attributes": list(vocab["attributes"])[:10],
    }


concepts = make_task("concepts", body)

if __name__ == "__main__":
    cli("concepts", body)
