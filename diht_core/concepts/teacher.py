"""The frozen teacher for concept distillation and its two linear concept classifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from ..config import TeacherParams
from ..data.images import read_decoded, to_device
from ..data.shards import Faults, shard_paths
from .labels import LABELS, label_vector
from .preprocess import Preprocess
from .soft_targets import SoftTargetCrossEntropy
from .towers import build_teacher, load_teacher, predicts_labels  # noqa: F401  (re-exported)
from .vocabulary import multi_hot, sqrt_resampling_weights


def load_teacher_split(directory: str | Path, pre: Preprocess, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        Faults]:
    """The labelled teacher split: uint8 images as the teacher's preprocessing crops them, their [N, len(LABELS)]
    multi-hot labels, and the samples skipped by reason (a fault, or a json without valid "labels": bad_json)."""
    images, labels, faults = [], [], Faults()
    for s in read_decoded(shard_paths(directory), pre.to_uint8, max_pixels):
        if faults.skip(s):
            continue
        try:
            labels.append(label_vector(s["json"]["labels"]))
        except (KeyError, TypeError):
            faults.count("bad_json")
            continue
        images.append(s["image"])
    if not images:
        raise ValueError(f"no usable sample in the teacher split {directory}: {faults.summary()}")
    return torch.stack(images), torch.from_numpy(np.stack(labels)), faults


def fit_teacher(model, pre: Preprocess, t: TeacherParams, images: torch.Tensor, labels: torch.Tensor, seed: int):
    """Pre-train the teacher on all but the first fifth of the split when it has no weights, freeze it.
    Returns (pre-training loss per epoch, mean average precision of the labels on the held-out fifth, None when its
    head does not predict them).

    The embedded default stands in for SWAG: a small timm model pre-trained (here, on a disjoint labelled
    synthetic split) and then frozen. Real teachers (SWAG's ViT-H/14: ``torchvision:vit_h_14``) come with weights
    from a local path."""
    n_val = max(1, len(images) // 5)
    losses = []
    if t.weights is None:
        losses = pretrain(model, pre, images[n_val:], labels[n_val:], t, seed)
    freeze(model)
    if not predicts_labels(model):
        return losses, None
    scores = torch.sigmoid(multilabel_scores(model, pre, images[:n_val])).numpy()
    return losses, mean_average_precision(scores, labels[:n_val].numpy())


def load_frozen_teacher(t: TeacherParams, teacher_file: Path) -> tuple[torch.nn.Module, Preprocess]:
    """The teacher the stage froze into teacher_file (teacher.pt), as another process (a torchrun rank) loads it:
    built as ``load_teacher`` builds it, with teacher_file's weights when it was pre-trained here (teacher.weights
    null; with weights the file holds them as they are), frozen."""
    if not teacher_file.exists():
        raise FileNotFoundError(f"stage teacher: {teacher_file} is missing; the stage writes it before the "
                                "features (python -m tasks.teacher)")
    model, pre = load_teacher(t)
    if t.weights is None:
        model.load_state_dict(torch.load(teacher_file, map_location="cpu", weights_only=True))
    return freeze(model), pre


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrain(model, pre: Preprocess, images: torch.Tensor, targets: torch.Tensor, t: TeacherParams,
             seed: int) -> list[float]:
    """Supervised multi-label pre-training (the SWAG stand-in) for t.pretrain_epochs at t.batch_size and t.lr, on
    images normalised by ``pre``. Returns the loss per epoch."""
    epochs, batch_size, lr = t.pretrain_epochs, t.batch_size, t.lr
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=True)  # one pass per tensor
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    model.train()
    losses = []
    with tqdm(total=steps, desc="teacher pre-train", mininterval=2.0) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(images), generator=g)
            total = 0.0
            for i in range(max(1, len(images) // batch_size)):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.binary_cross_entropy_with_logits(model(pre.normalize(images[idx])), targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                bar.update(1)
            losses.append(total / max(1, len(images) // batch_size))
    model.eval()
    return losses


@torch.no_grad()
def features(model, pre: Preprocess, images: torch.Tensor,
             batch_size: int = TeacherParams().feature_batch_size) -> torch.Tensor:
    """Penultimate features (the input of the classification head) of a frozen teacher on uint8 images preprocessed
    by ``pre``, computed on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = pre.normalize(to_device(images[i:i + batch_size], device))
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def multilabel_scores(model, pre: Preprocess, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(pre.normalize(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    cols = [j for j in range(targets.shape[1]) if 0 < targets[:, j].sum() < len(targets)]
    if not cols:
        return float("nan")
    return float(np.mean([average_precision_score(targets[:, j], scores[:, j]) for j in cols]))


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int = 1) -> float:
    """Share of samples (with any concept) whose top-k predictions contain a true concept."""
    has = targets.sum(1) > 0
    if not has.any():
        return float("nan")
    top = np.argsort(-scores[has], axis=1)[:, :k]
    return float(np.mean([targets[has][i, top[i]].any() for i in range(len(top))]))


def train_concept_classifier(feats: torch.Tensor, targets: np.ndarray, weights: np.ndarray, t: TeacherParams,
                             seed: int, batch_size: int = 256) -> torch.nn.Linear:
    """Linear classifier on frozen features (t.classifier_epochs at t.classifier_lr), soft-target CE against
    normalised multi-hot targets, with samples drawn by the square-root re-sampling weights."""
    epochs, lr = t.classifier_epochs, t.classifier_lr
    g = torch.Generator().manual_seed(seed)
    feats = feats.float()
    mu, sd = feats.mean(0, keepdim=True), feats.std(0, keepdim=True).clamp_min(1e-6)
    clf = torch.nn.Linear(feats.shape[1], targets.shape[1])
    t = torch.from_numpy(targets)
    t = t / t.sum(1, keepdim=True).clamp_min(1e-12)
    probs = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    n_draw = len(feats)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    ce = SoftTargetCrossEntropy()
    x_all = (feats - mu) / sd
    for _ in range(epochs):
        draw = torch.multinomial(probs, n_draw, replacement=True, generator=g)
        for i in range(0, n_draw, batch_size):
            idx = draw[i:i + batch_size]
            loss = ce(clf(x_all[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    # fold the standardisation into the linear layer so it applies to raw features
    with torch.no_grad():
        w = clf.weight / sd
        b = clf.bias - (w * mu).sum(1)
        clf.weight.copy_(w)
        clf.bias.copy_(b)
    return clf


def train_classifiers(feats: torch.Tensor, keys: list[str], decisions, vocab: dict, t: TeacherParams,
                      seed: int) -> tuple[dict, dict]:
    """The objects and attributes classifiers on the teacher features of these keys, their targets the caption
    concepts of the CAT decisions table (indexed by key); a random tenth of the keys is held out.
    Returns ({kind: {"state_dict", "names"}} as saved in classifiers.pt, {kind: held-out metrics})."""
    dec = decisions.loc[keys]
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(keys)) < 0.1
    classifiers, metrics = {}, {}
    for kind, column in (("objects", "objects"), ("attributes", "attributes")):
        names = list(vocab[kind])
        y = multi_hot(dec[column].map(list), names)
        w = sqrt_resampling_weights(y[~is_val])
        clf = train_concept_classifier(feats[~is_val], y[~is_val], w, t, seed)
        with torch.no_grad():
            s = clf(feats[is_val]).numpy()
        metrics[kind] = {"heldout_map": mean_average_precision(s, y[is_val]),
                         "heldout_top1_acc": topk_accuracy(s, y[is_val], 1),
                         "heldout_top5_acc": topk_accuracy(s, y[is_val], 5), "size": len(names)}
        classifiers[kind] = {"state_dict": clf.state_dict(), "names": names}
    return classifiers, metrics


def load_classifiers(path: str | Path) -> tuple[dict, dict]:
    """({kind: linear head in eval mode}, {kind: concept names}) from a classifiers.pt."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    heads, names = {}, {}
    for kind in ("objects", "attributes"):
        sd = saved[kind]["state_dict"]
        lin = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
        lin.load_state_dict(sd)
        heads[kind] = lin.eval()
        names[kind] = saved[kind]["names"]
    return heads, names
