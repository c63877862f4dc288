"""Pseudo-labelling: the concept classifiers' top-k predictions on every cached teacher-feature shard (one output
file per feature shard, written atomically, reused while valid; in this process or on torchrun ranks), how many
of the caption's own concepts they cover, and, against the planted truth, how well they recover the concepts the
captions omitted."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..config import PseudoLabelParams
from ..data.planted import CONCEPTS, ratio
from ..data.pseudo_labels import save_shard, sparsify
from ..launch import destroy, init_distributed, rank_share, sum_counts
from .teacher import load_classifiers


def labels_digest(classifiers_file: Path, top_k: int):
    """The hash of what every pseudo-label shard depends on besides its feature shard: the classifiers and top_k."""
    digest = hashlib.sha256(classifiers_file.read_bytes())
    digest.update(f"top_k={top_k}".encode())
    return digest


def _valid(path: Path, digest: str) -> bool:
    try:
        return str(np.load(path)["digest"]) == digest
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def label_shard(heads: dict, feature_file: Path, out_file: Path, top_k: int, base_digest) -> bool:
    """The pseudo-labels of one feature shard, unless out_file already holds them (its digest: ``base_digest`` and
    the feature file's bytes). Returns True when reused."""
    raw = feature_file.read_bytes()
    digest = base_digest.copy()
    digest.update(raw)
    digest = digest.hexdigest()[:24]
    if _valid(out_file, digest):
        return True
    z = np.load(feature_file)
    feats = torch.from_numpy(z["features"].astype(np.float32))
    with torch.no_grad():
        sparse = {kind: sparsify(torch.softmax(lin(feats), dim=-1), top_k) for kind, lin in heads.items()}
    save_shard(out_file, z["keys"].tolist(), sparse["objects"], sparse["attributes"], digest)
    return False


def label_shards(heads: dict, feature_files: list[Path], out: Path, top_k: int,
                 classifiers_file: Path) -> dict[str, int]:
    """``label_shard`` for each of these feature files (a rank's share); {"written": n, "reused": m}."""
    out.mkdir(parents=True, exist_ok=True)
    base = labels_digest(classifiers_file, top_k)
    counts = {"written": 0, "reused": 0}
    for f in feature_files:
        counts["reused" if label_shard(heads, f, out / f"{f.stem}.npz", top_k, base) else "written"] += 1
    return counts


def label_rank_share(pl: PseudoLabelParams, feature_dir: Path, out: Path, classifiers_file: Path) -> dict[str, int]:
    """On a torchrun rank (teacher.launcher: torchrun): the pseudo-labels of this rank's share of the feature
    shards (shard i on rank i % world), on the CPU; the counts of ``label_shards`` summed over ranks."""
    info = init_distributed("cpu", "teacher")
    try:
        heads, _ = load_classifiers(classifiers_file)
        files = rank_share(sorted(feature_dir.glob("*.npz")), info)
        return sum_counts(label_shards(heads, files, out, pl.top_k, classifiers_file), info)
    finally:
        destroy(info)


def remove_stale(feature_dir: Path, out: Path) -> None:
    """Pseudo-label files of feature shards that are gone."""
    wanted = {f.stem for f in feature_dir.glob("*.npz")}
    for old in out.glob("*.npz"):
        if old.stem not in wanted:
            old.unlink()


def pseudo_label_metrics(pl: PseudoLabelParams, names: dict, feature_dir: Path, decisions, out: Path) -> dict:
    """The stage metrics, read from the pseudo-label file of every feature shard; the caption concepts come from the
    CAT decisions table (indexed by key)."""
    n, total_bytes, hits_all, hits_any, with_concepts = 0, 0, 0, 0, 0
    index = {kind: {c: i for i, c in enumerate(names[kind])} for kind in ("objects", "attributes")}
    for f in sorted(feature_dir.glob("*.npz")):
        z = np.load(out / f.name)
        keys = z["keys"].tolist()
        sparse = {"objects": (z["obj_idx"], z["obj_p"]), "attributes": (z["attr_idx"], z["attr_p"])}
        n += len(keys)
        total_bytes += sum(a.nbytes for pair in sparse.values() for a in pair)
        for kind in ("objects", "attributes"):
            for row, key in enumerate(keys):
                wanted = {index[kind][c] for c in decisions.at[key, kind] if c in index[kind]}
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


def predicted_concepts(names: dict, feature_dir: Path, out: Path) -> Iterator[tuple[str, dict[str, float]]]:
    """(key, {concept name: pseudo-label probability}) of every labelled sample: its top-k objects and top-k
    attributes (the kinds pooled; a probability rounded to 0 in fp16 still counts as predicted)."""
    for f in sorted(feature_dir.glob("*.npz")):
        z = np.load(out / f.name)
        sparse = {"objects": (z["obj_idx"], z["obj_p"]), "attributes": (z["attr_idx"], z["attr_p"])}
        for row, key in enumerate(z["keys"].tolist()):
            pred = {}
            for kind, (idx, p) in sparse.items():
                for i, prob in zip(idx[row].tolist(), p[row].astype(np.float32).tolist()):
                    pred[names[kind][i]] = max(pred.get(names[kind][i], 0.0), prob)
            yield key, pred


def omitted_concepts(samples: Iterable[tuple[dict[str, float], dict]]) -> dict | None:
    """Pseudo-label precision and recall on the concepts the captions omitted, against the planted truth.

    ``samples``: (predicted, truth) per sample: predicted = {concept: probability} of its top-k pseudo-labels
    (``predicted_concepts``), truth = {"true": the concepts in the image, "omitted": those named in none of its
    captions} (data/planted.py). Only the predicted concepts the planted truth can judge (shape names, colour and
    size words: planted.CONCEPTS) count. Per sample, with P those predictions, T the true concepts, O the omitted
    ones and T - O the concepts the captions name; pooled over samples (micro averages):

        precision = sum |P & O| / sum |P - (T - O)|   of the predictions that add to the caption, the share truly
                                                       in the image (a prediction outside T is a false one);
        recall    = sum |P & O| / sum |O|              the share of the omitted concepts the pseudo-labels carry.

    Also: n_omitted (sum |O|), n_predicted_new (sum |P - (T - O)|), samples (judged), samples_with_omitted, and the
    mean pseudo-label probability of an omitted concept (mean_probability_omitted) and of a concept not in the
    image (mean_probability_absent), which tell a teacher's ranking apart even where top-k takes in nearly every
    concept. None when no sample carries planted truth."""
    n, with_omitted, hits, new, omitted, p_omitted, p_absent, n_absent = 0, 0, 0, 0, 0, 0.0, 0.0, 0
    for predicted, truth in samples:
        pred = {c for c in predicted if c in CONCEPTS}
        true, gone = truth["true"], truth["omitted"]
        n += 1
        with_omitted += bool(gone)
        hits += len(pred & gone)
        new += len(pred - (true - gone))
        omitted += len(gone)
        p_omitted += sum(predicted.get(c, 0.0) for c in gone)
        absent = CONCEPTS - true
        p_absent += sum(predicted.get(c, 0.0) for c in absent)
        n_absent += len(absent)
    if n == 0:
        return None
    return {"precision": ratio(hits, new), "recall": ratio(hits, omitted), "n_omitted": omitted,
            "n_predicted_new": new, "samples": n, "samples_with_omitted": with_omitted,
            "mean_probability_omitted": ratio(p_omitted, omitted), "mean_probability_absent": ratio(p_absent, n_absent)}


def omitted_concept_metrics(names: dict, feature_dir: Path, out: Path, planted: dict[str, dict]) -> dict | None:
    """``omitted_concepts`` of the pseudo-labels in ``out`` against the planted truth ({key: planted_concepts},
    data/planted.py read_planted_concepts); None when no labelled sample carries it."""
    return omitted_concepts((pred, planted[key]) for key, pred in predicted_concepts(names, feature_dir, out)
                            if key in planted)
