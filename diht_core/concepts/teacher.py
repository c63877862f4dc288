"""The frozen teacher for concept distillation and its two linear concept classifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from ..config import TeacherParams
from ..data.images import normalize_images
from ..data.scenes import COLOURS, RELATIONS, SHAPES, SIZES
from ..data.shards import Faults, read_decoded, shard_paths
from ..models import create_model, image_size
from .soft_targets import SoftTargetCrossEntropy
from .vocabulary import multi_hot, sqrt_resampling_weights

LABELS = ([f"shape:{s}" for s in SHAPES] + [f"colour:{c}" for c in COLOURS] + [f"size:{s}" for s in SIZES]
          + [f"relation:{r}" for r in RELATIONS] + [f"count:{k}" for k in (1, 2, 3)])


def label_vector(labels: dict) -> np.ndarray:
    """Multi-hot over LABELS from a teacher-split json's "labels"."""
    on = ({f"shape:{s}" for s in labels["shapes"]} | {f"colour:{c}" for c in labels["colours"]}
          | {f"size:{s}" for s in labels["sizes"]} | {f"count:{labels['count']}"}
          | ({f"relation:{labels['relation']}"} if labels.get("relation") else set()))
    return np.array([1.0 if name in on else 0.0 for name in LABELS], dtype=np.float32)


def load_teacher_split(directory: str | Path, size: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor, Faults]:
    """The labelled teacher split: uint8 images at ``size``, their [N, len(LABELS)] multi-hot labels, and the
    samples skipped by reason (a fault, or a json without valid "labels": bad_json)."""
    images, labels, faults = [], [], Faults()
    for s in read_decoded(shard_paths(directory), size, max_pixels):
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


class OpenCLIPTower(torch.nn.Module):
    """An open_clip image tower with timm's feature/head interface and a multi-label head."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        self.visual = create_model(name)[0].visual
        self.num_features = self.visual.output_dim
        self.head = torch.nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.visual(x)

    def forward_head(self, features, pre_logits: bool = False):
        return features if pre_logits else self.head(features)

    def forward(self, x):
        return self.head(self.visual(x))

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if not any(k.startswith("head.") for k in state):  # a plain open_clip checkpoint: take its visual.*
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            return self.visual.load_state_dict(state, strict=strict)
        return super().load_state_dict(state, strict=strict, assign=assign)


def build_teacher(arch: str, weights: str | Path | None = None) -> torch.nn.Module:
    """A timm model (``resnet18``) or an open_clip image tower (``open_clip:ViT-B-32``) with a multi-label
    head; weights from a local file (never from a hub)."""
    if arch.startswith("open_clip:"):
        model = OpenCLIPTower(arch.split(":", 1)[1], len(LABELS))
    else:
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=len(LABELS))
        except RuntimeError as err:
            raise ValueError(f"teacher.arch: unknown timm model {arch!r}") from err
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"teacher.weights: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model


def fit_teacher(t: TeacherParams, images: torch.Tensor, labels: torch.Tensor, seed: int):
    """Build the teacher, pre-train it on all but the first fifth of the split when it has no weights, freeze it.
    Returns (model, pre-training loss per epoch, mean average precision of the labels on the held-out fifth).

    The embedded default stands in for SWAG: a small timm model pre-trained (here, on a disjoint labelled
    synthetic split) and then frozen. Any timm model works; weights come from a local path."""
    n_val = max(1, len(images) // 5)
    model = build_teacher(t.arch, t.weights)
    if isinstance(model, OpenCLIPTower) and image_size(model) != t.image_size:
        raise ValueError(f"teacher.image_size={t.image_size} but {t.arch} takes {image_size(model)} px images")
    losses = []
    if t.weights is None:
        losses = pretrain(model, images[n_val:], labels[n_val:], t, seed)
    freeze(model)
    scores = torch.sigmoid(multilabel_scores(model, images[:n_val])).numpy()
    return model, losses, mean_average_precision(scores, labels[:n_val].numpy())


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrain(model, images: torch.Tensor, targets: torch.Tensor, t: TeacherParams, seed: int) -> list[float]:
    """Supervised multi-label pre-training (the SWAG stand-in) for t.pretrain_epochs at t.batch_size and t.lr.
    Returns the loss per epoch."""
    epochs, batch_size, lr = t.pretrain_epochs, t.batch_size, t.lr
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
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
                loss = F.binary_cross_entropy_with_logits(model(normalize_images(images[idx])), targets[idx])
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
def features(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled pre-logit features of a frozen timm model."""
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize_images(images[i:i + batch_size])
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def multilabel_scores(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(normalize_images(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


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
