"""Frozen-teacher features: the per-shard fp16 cache of the training set, and the linear probe on an eval split."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from ..config import TeacherParams
from ..data.files import atomic_savez
from ..data.images import load_split, read_decoded
from ..data.shards import Faults
from ..launch import destroy, init_distributed, rank_share, sum_counts
from .preprocess import Preprocess
from .teacher import features, load_frozen_teacher
from .towers import teacher_preprocess


def _load_cache(path: Path, digest: str, load: bool = True):
    """(keys, fp32 features, {fault reason: samples skipped}) from a feature cache file, or None if missing, stale
    or unreadable; load False: True instead of the contents when the file is valid."""
    try:
        z = np.load(path)
        if str(z["digest"]) != digest:
            return None
        if not load:
            return True
        return (z["keys"].tolist(), torch.from_numpy(z["features"].astype(np.float32)),
                json.loads(str(z["faults"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def teacher_digest(teacher_file: Path, t: TeacherParams, pre: Preprocess, max_pixels: int):
    """The hash of what every shard's features depend on besides the shard: the teacher's weights (teacher.pt,
    streamed: a ViT-H/14 file is 2.5 GB), arch, preprocessing and the pixel limit."""
    with teacher_file.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    digest.update(f"{t.arch}/{pre}/{max_pixels}".encode())
    return digest


def shard_features(model, pre: Preprocess, shard: Path, cache: Path, base_digest, max_pixels: int,
                   batch_size: int, load: bool = True):
    """The features of one shard from its cache file when that is valid (its digest: ``base_digest`` and the
    shard's content), else computed (batch by batch as the shard streams) and written atomically.
    Returns ((keys, fp32 features, [faults by reason, truncated]) or None when load is False and the cache was
    valid, reused)."""
    digest = base_digest.copy()
    digest.update(shard.read_bytes())
    digest = digest.hexdigest()[:24]
    cached = _load_cache(cache, digest, load)
    if cached is not None:
        return (cached if load else None), True
    ks, feats, batch, faults = [], [], [], Faults()
    for s in read_decoded([shard], pre.to_uint8, max_pixels):
        if faults.skip(s):
            continue
        ks.append(s["key"])
        batch.append(s["image"])
        if len(batch) == batch_size:
            feats.append(features(model, pre, torch.stack(batch), batch_size))
            batch = []
    if batch:
        feats.append(features(model, pre, torch.stack(batch), batch_size))
    f = torch.cat(feats) if feats else torch.zeros(0, model.num_features)
    recorded = [faults.by_reason, faults.truncated]
    atomic_savez(cache, keys=np.array(ks, dtype=str), features=f.numpy().astype(np.float16), digest=np.array(digest),
                 faults=np.array(json.dumps(recorded)))
    return (ks, f.half().float(), recorded), False


def extract_features(model, pre: Preprocess, shards: list[Path], cache_dir: Path, teacher_file: Path,
                     t: TeacherParams, max_pixels: int) -> dict[str, int]:
    """Write the feature cache of each of these shards that has no valid one (a rank's share); returns
    {"extracted": shards computed, "reused": shards whose cache was valid}."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = teacher_digest(teacher_file, t, pre, max_pixels)
    counts = {"extracted": 0, "reused": 0}
    for shard in tqdm(shards, desc="teacher features", mininterval=2.0):
        _, reused = shard_features(model, pre, shard, cache_dir / f"{shard.stem}.npz", base, max_pixels,
                                   t.feature_batch_size, load=False)
        counts["reused" if reused else "extracted"] += 1
    return counts


def extract_rank_share(t: TeacherParams, shards: list[Path], cache_dir: Path, teacher_file: Path,
                       max_pixels: int) -> dict[str, int]:
    """On a torchrun rank (teacher.launcher: torchrun): load the frozen teacher onto this rank's device
    (teacher.device) and extract the features of its share of the shards (shard i on rank i % world); returns the
    counts of ``extract_features`` summed over ranks."""
    info = init_distributed(t.device, "teacher")
    try:
        model, pre = load_frozen_teacher(t, teacher_file)
        model.to(info.device)
        counts = extract_features(model, pre, rank_share(shards, info), cache_dir, teacher_file, t, max_pixels)
        return sum_counts(counts, info)
    finally:
        destroy(info)


def cached_features(model, shards: list[Path], cache_dir: Path, teacher_file: Path, t: TeacherParams, max_pixels: int):
    """Teacher features of every sample of these shards (read with the teacher's preprocessing,
    ``teacher_preprocess``, computed on the model's device), one fp16 .npz per shard in cache_dir, reused while its
    digest (teacher weights, arch, preprocessing, max_pixels, shard content) matches; cache files of other shards
    are removed. A sample with a fault is skipped and counted (the counts are cached with the features).
    Returns (keys, fp32 features [N, D] as stored in fp16, number of shards reused, Faults)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pre = teacher_preprocess(model, t)
    base = teacher_digest(teacher_file, t, pre, max_pixels)
    keys, feats, faults = [], [], Faults()
    reused = 0
    for shard in tqdm(shards, desc="teacher features", mininterval=2.0):
        (ks, f, recorded), was_cached = shard_features(model, pre, shard, cache_dir / f"{shard.stem}.npz", base,
                                                       max_pixels, t.feature_batch_size)
        keys.extend(ks)
        feats.append(f)
        faults.merge(*recorded)
        reused += was_cached
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
