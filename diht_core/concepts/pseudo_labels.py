"""Pseudo-labelling: the concept classifiers' top-k predictions on every cached teacher-feature shard (one output
file per feature shard, written atomically, reused while valid; in this process or on torchrun ranks), and how many
of the caption's own concepts they cover."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import PseudoLabelParams
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
