"""Frozen-teacher features: the per-shard fp16 cache of the training set, and the linear probe on an eval split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from ..config import TeacherParams
from ..data.files import atomic_savez
from ..data.shards import Faults, load_split, read_decoded
from .teacher import features
from .towers import teacher_preprocess


def _load_cache(path: Path, digest: str):
    """(keys, fp32 features, {fault reason: samples skipped}) from a feature cache file, or None if missing, stale
    or unreadable."""
    try:
        z = np.load(path)
        if str(z["digest"]) != digest:
            return None
        return (z["keys"].tolist(), torch.from_numpy(z["features"].astype(np.float32)),
                json.loads(str(z["faults"])))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def cached_features(model, shards: list[Path], cache_dir: Path, teacher_file: Path, t: TeacherParams, max_pixels: int):
    """Teacher features of every sample of these shards (read with the teacher's preprocessing,
    ``teacher_preprocess``), one fp16 .npz per shard in cache_dir, reused while its digest (teacher weights, arch,
    preprocessing, max_pixels, shard content) matches; cache files of other shards are removed.
    A sample with a fault is skipped and counted (the counts are cached with the features).
    Returns (keys, fp32 features [N, D] as stored in fp16, number of shards reused, Faults)."""
    cache_dir.mkdir(exist_ok=True)
    pre = teacher_preprocess(model, t)
    with teacher_file.open("rb") as f:  # streamed: a ViT-H/14 file is 2.5 GB
        teacher_digest = hashlib.file_digest(f, "sha256")
    teacher_digest.update(f"{t.arch}/{pre}/{max_pixels}".encode())
    keys, feats, faults = [], [], Faults()
    reused = 0
    for shard in tqdm(shards, desc="teacher features", mininterval=2.0):
        cache = cache_dir / f"{shard.stem}.npz"
        digest = teacher_digest.copy()
        digest.update(shard.read_bytes())  # teacher weights, arch, preprocessing and the shard's content
        digest = digest.hexdigest()[:24]
        cached = _load_cache(cache, digest)
        if cached is not None:
            keys.extend(cached[0])
            feats.append(cached[1])
            faults.merge(*cached[2])
            reused += 1
            continue
        ks, ims, shard_faults = [], [], Faults()
        for s in read_decoded([shard], pre.to_uint8, max_pixels):
            if shard_faults.skip(s):
                continue
            ks.append(s["key"])
            ims.append(s["image"])
        faults.merge(shard_faults.by_reason, shard_faults.truncated)
        f = features(model, pre, torch.stack(ims)) if ims else torch.zeros(0, model.num_features)
        atomic_savez(cache, keys=np.array(ks, dtype=str), features=f.numpy().astype(np.float16),
                     digest=np.array(digest),
                     faults=np.array(json.dumps([shard_faults.by_reason, shard_faults.truncated])))
        keys.extend(ks)
        feats.append(f.half().float())
    for stale in list(cache_dir.glob("*.npz")):
        if stale.stem not in {s.stem for s in shards}:
            stale.unlink()
    return keys, torch.cat(feats), reused, faults


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a logistic-regression probe fitted on the train features."""
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def split_probe_accuracy(encode: Callable[[torch.Tensor], torch.Tensor], directory: Path,
                         size: int | Callable[[Image.Image], torch.Tensor], max_pixels: int,
                         faults: Faults | None = None) -> float:
    """The linear probe on the features ``encode`` gives of directory/train and directory/test (uint8 images at
    size, or as the function size makes them: ``load_split``); bad samples (a cls that is missing or no integer too)
    are skipped and counted in ``faults`` (without it, an error)."""
    tr = load_split(directory / "train", size, max_pixels, faults, need_label=True)
    te = load_split(directory / "test", size, max_pixels, faults, need_label=True)
    return probe_accuracy(encode(tr["images"]).numpy(), tr["cls"].numpy(), encode(te["images"]).numpy(),
                          te["cls"].numpy())
