"""Stage `teacher`: a frozen timm teacher, its cached features, and the two concept classifiers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from diht_core import teacher as T
from diht_core.benchmark import encode_images
from diht_core.data.shards import load_split
from diht_core.concepts import multi_hot, sqrt_resampling_weights
from diht_core.data.shards import decode_image, read_samples, shard_paths
from diht_core.models import create_model, image_size
from diht_core.data.images import image_to_uint8

from ._stage import cli, make_task


def _load_teacher_split(directory: Path, size: int):
    images, labels = [], []
    for shard in shard_paths(directory):
        for s in read_samples(shard):
            images.append(image_to_uint8(decode_image(s["image_bytes"]), size))
            labels.append(T.label_vector(s["json"]["labels"]))
    return torch.stack(images), torch.from_numpy(np.stack(labels))


def _load_cache(path: Path, digest: str):
    """(keys, fp32 features) from a feature cache file, or None if missing, stale or unreadable."""
    try:
        z = np.load(path)
        if str(z["digest"]) != digest:
            return None
        return z["keys"].tolist(), torch.from_numpy(z["features"].astype(np.float32))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def body(p, run) -> dict:
    t = p.teacher
    data = Path(p.paths.data)
    out = data / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    images, labels = _load_teacher_split(data / "raw" / "teacher", t.image_size)
    n_val = max(1, len(images) // 5)
    model = T.build_teacher(t.arch, t.weights)
    if isinstance(model, T.OpenCLIPTower) and image_size(model) != t.image_size:
        raise ValueError(f"teacher.image_size={t.image_size} but {t.arch} takes {image_size(model)} px images")
    losses = []
    if t.weights is None:
        losses = T.pretrain(model, images[n_val:], labels[n_val:], t.pretrain_epochs, t.batch_size, t.lr, p.seed)
    T.freeze(model)
    torch.save(model.state_dict(), out / "teacher.pt")
    teacher_digest = hashlib.sha256((out / "teacher.pt").read_bytes() + f"{t.arch}/{t.image_size}".encode())
    scores = torch.sigmoid(T.multilabel_scores(model, images[:n_val])).numpy()
    heldout_map = T.mean_average_precision(scores, labels[:n_val].numpy())

    # teacher vs the student at step 0: the same linear probe on synthetic_shape features
    eval_dir = data / "eval" / "synthetic_shape"
    tr, te = load_split(eval_dir / "train", t.image_size), load_split(eval_dir / "test", t.image_size)
    teacher_acc = _probe_accuracy(T.features(model, tr["images"]).numpy(), tr["cls"].numpy(),
                                  T.features(model, te["images"]).numpy(), te["cls"].numpy())
    student, _, _ = create_model(p.train.model)
    size = image_size(student)
    tr_s, te_s = load_split(eval_dir / "train", size), load_split(eval_dir / "test", size)
    student_acc = _probe_accuracy(encode_images(student, tr_s["images"]).numpy(), tr_s["cls"].numpy(),
                                  encode_images(student, te_s["images"]).numpy(), te_s["cls"].numpy())

    # features of the filtered training set, cached per shard in fp16
    feat_dir = out / "features"
    feat_dir.mkdir(exist_ok=True)
    keys, feats = [], []
    shards = shard_paths(data / "filtered")
    reused = 0
    for shard in tqdm(shards, desc="teacher features", mininterval=2.0):
        cache = feat_dir / f"{shard.stem}.npz"
        digest = teacher_digest.copy()
        digest.update(shard.read_bytes())  # teacher weights, arch, size and the shard's content
        digest = digest.hexdigest()[:24]
        cached = _load_cache(cache, digest)
        if cached is not None:
            keys.extend(cached[0])
            feats.append(cached[1])
            reused += 1
            continue
        ks, ims = [], []
        for s in read_samples(shard):
            ks.append(s["key"])
            ims.append(image_to_uint8(decode_image(s["image_bytes"]), t.image_size))
        f = T.features(model, torch.stack(ims)) if ims else torch.zeros(0, model.num_features)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, keys=np.array(ks, dtype=str), features=f.numpy().astype(np.float16), digest=np.array(digest))
        os.replace(tmp, cache)
        keys.extend(ks)
        feats.append(f.half().float())
    for stale in list(feat_dir.glob("*.npz")):
        if stale.stem not in {s.stem for s in shards}:
            stale.unlink()
    feats = torch.cat(feats)
    print(f"[teacher] features: {len(shards) - reused} shards extracted, {reused} reused from the cache")

    # the two concept classifiers on frozen teacher features
    vocab = json.loads((data / "concepts" / "vocab.json").read_text())
    dec = pd.read_parquet(data / "cat" / "decisions.parquet").set_index("key").loc[keys]
    rng = np.random.default_rng(p.seed)
    is_val = rng.random(len(keys)) < 0.1
    classifiers, metrics_c = {}, {}
    for kind, column in (("objects", "objects"), ("attributes", "attributes")):
        names = list(vocab[kind])
        y = multi_hot(dec[column].map(list), names)
        w = sqrt_resampling_weights(y[~is_val])
        clf = T.train_concept_classifier(feats[~is_val], y[~is_val], w, t.classifier_epochs, t.classifier_lr, p.seed)
        with torch.no_grad():
            s = clf(feats[is_val]).numpy()
        metrics_c[kind] = {"heldout_map": T.mean_average_precision(s, y[is_val]),
                           "heldout_top1_acc": T.topk_accuracy(s, y[is_val], 1),
                           "heldout_top5_acc": T.topk_accuracy(s, y[is_val], 5), "size": len(names)}
        classifiers[kind] = {"state_dict": clf.state_dict(), "names": names}
    torch.save(classifiers, out / "classifiers.pt")
    for i, l in enumerate(losses):
        run.log_step(i + 1, {"pretrain_loss": l})
    return {
        "arch": t.arch,
        "pretrained_here": t.weights is None,
        "heldout_label_map": heldout_map,
        "shape_probe_acc_teacher": teacher_acc,
        "shape_probe_acc_student_step0": student_acc,
        "teacher_stronger_than_student": teacher_acc > student_acc,
        "classifiers": metrics_c,
    }


teacher = make_task("teacher", body)

if __name__ == "__main__":
    cli("teacher", body)
