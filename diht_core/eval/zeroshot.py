"""Zero-shot classification: prompt-ensembled classifier and CLIP_benchmark metrics."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def build_classifier(text_encode: Callable[[list[str]], torch.Tensor], classnames: list[str],
                     templates: list[str]) -> torch.Tensor:
    """Class weights [d, C]: per class, normalise each prompt embedding, average, renormalise."""
    cols = []
    for c in classnames:
        emb = text_encode([t.format(c=c) for t in templates]).float()
        w = F.normalize(emb, dim=-1).mean(dim=0)
        cols.append(w / w.norm())
    return torch.stack(cols, dim=1)


def mean_per_class_recall(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """sklearn balanced_accuracy_score: mean recall over the classes present in targets."""
    classes = torch.unique(targets)
    recalls = [(pred[targets == c] == c).double().mean() for c in classes]
    return torch.stack(recalls).mean().item()


@torch.no_grad()
def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """acc1, acc5 (nan when fewer than 5 classes) and mean_per_class_recall, as CLIP_benchmark."""
    logits, targets = logits.float(), torch.as_tensor(targets, device=logits.device).long()
    n, C = logits.shape
    topk = logits.topk(min(5, C), dim=1).indices  # same tie order as CLIP_benchmark's accuracy()
    hit = topk == targets[:, None]
    acc1 = hit[:, 0].sum().item() / n
    acc5 = hit.any(dim=1).sum().item() / n if C >= 5 else float("nan")
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets)}


@torch.no_grad()
def zero_shot_classification(image_emb: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor) -> dict:
    """logits = 100 * normalize(image_emb) @ classifier, then classification_metrics."""
    logits = 100.0 * F.normalize(image_emb.float(), dim=-1) @ classifier.float()
    return classification_metrics(logits, targets)
