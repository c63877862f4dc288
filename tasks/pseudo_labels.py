"""Stage `pseudo_labels`: top-k sparsified teacher concept predictions for every training sample."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diht_core.concepts.pseudo_labels import write_pseudo_labels
from diht_core.concepts.teacher import load_classifiers
from diht_core.data.files import atomic_write_text

from ._stage import cli, make_task


def body(p, run) -> dict:
    data = Path(p.paths.data)
    heads, names = load_classifiers(data / "teacher" / "classifiers.pt")
    decisions = pd.read_parquet(data / "cat" / "decisions.parquet").set_index("key")
    out = data / "pseudo_labels"
    metrics = write_pseudo_labels(p.pseudo_labels, heads, names, data / "teacher" / "features", decisions, out)
    sizes = {k: len(names[k]) for k in ("objects", "attributes")}
    atomic_write_text(out / "vocab_sizes.json", json.dumps(sizes) + "\n")
    return metrics


pseudo_labels = make_task("pseudo_labels", body)

if __name__ == "__main__":
    cli("pseudo_labels", body)
