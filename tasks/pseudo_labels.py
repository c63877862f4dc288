"""Stage `pseudo_labels`: top-k sparsified teacher concept predictions for every training sample, one file per
feature shard, in this process or on torchrun ranks (`teacher.launcher`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diht_core.concepts.pseudo_labels import (label_rank_share, label_shards, omitted_concept_metrics,
                                              pseudo_label_metrics, remove_stale)
from diht_core.concepts.teacher import load_classifiers
from diht_core.data.files import atomic_write_text
from diht_core.data.planted import read_planted_concepts
from diht_core.launch import launch_torchrun, launched_by_torchrun, local_world_size

from ._ranks import rank_args, write_result
from ._stage import STATE_DIR, cli, make_task


def body(p, run) -> dict:
    data = Path(p.paths.data)
    t, pl = p.teacher, p.pseudo_labels
    classifiers, features = data / "teacher" / "classifiers.pt", data / "teacher" / "features"
    heads, names = load_classifiers(classifiers)
    out = data / "pseudo_labels"
    remove_stale(features, out)
    if t.launcher == "torchrun":
        ranks = local_world_size(t.nproc_per_node, t.device)
        counts = launch_torchrun(p, "tasks.pseudo_labels", ranks, STATE_DIR / "torchrun", {}, nnodes=t.nnodes,
                                 rdzv_endpoint=t.rdzv_endpoint)
        where = f"on torchrun ranks ({ranks} a machine x {t.nnodes})"
    else:
        counts, where = label_shards(heads, sorted(features.glob("*.npz")), out, pl.top_k, classifiers), "here"
    print(f"[pseudo_labels] {where}: {counts['written']} shards written, {counts['reused']} reused")
    decisions = pd.read_parquet(data / "cat" / "decisions.parquet").set_index("key")
    metrics = pseudo_label_metrics(pl, names, features, decisions, out)
    omitted = omitted_concept_metrics(names, features, out, read_planted_concepts(data / "filtered"))
    if omitted is not None:  # the planted truth of the synthetic world: absent from a URL list's data
        metrics["omitted_concepts"] = omitted
    sizes = {k: len(names[k]) for k in ("objects", "attributes")}
    atomic_write_text(out / "vocab_sizes.json", json.dumps(sizes) + "\n")
    return metrics


def label_on_rank() -> None:
    """A torchrun rank of `teacher.launcher: torchrun`: the pseudo-labels of its share of the feature shards."""
    p, result = rank_args("pseudo_labels")
    data = Path(p.paths.data)
    write_result(result, label_rank_share(p.pseudo_labels, data / "teacher" / "features", data / "pseudo_labels",
                                          data / "teacher" / "classifiers.pt"))


pseudo_labels = make_task("pseudo_labels", body)

if __name__ == "__main__":
    label_on_rank() if launched_by_torchrun() else cli("pseudo_labels", body)
