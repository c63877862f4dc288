"""Training losses, open_clip's call convention: loss(image_features, text_features, logit_scale).

Each contrastive loss is the mean over the batch, averaged over the two directions.
Distributed gathering lives apart (``gather_features``); on one process it is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_features(image_features, text_features, rank: int = 0, world_size: int = 1):
    """All-gather features across ranks with gradients (identity on one process)."""
    if world_size == 1:
        return image_features, text_features
    import torch.distributed.nn as dist_nn

    all_image = torch.cat(dist_nn.all_gather(image_features), dim=0)
    all_text = torch.cat(dist_nn.all_gather(text_features), dim=0)
    return all_image, all_text


class ContrastiveLoss(nn.Module):
    """InfoNCE (CLIP): symmetric cross-entropy over the image-text similarity matrix."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale):
        all_image, all_text = gather_features(image_features, text_features, self.rank, self.world_size)
        # local loss: local rows against all columns, labels offset by rank
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a target distribution (concept distillation, teacher classifiers)."""

    def forward(self, logits, target_probs, weight=None):
        loss = -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        if weight is not None:
            return (loss * weight).sum() / weight.sum().clamp_min(1e-12)
        return loss.mean()


class ConceptDistillationLoss(nn.Module):
    """lambda_obj * CE(p_obj, f_obj(x)) + lambda_attr * CE(p_attr, f_attr(x)); 0 weights turn it off."""

    def __init__(self, lambda_obj: float, lambda_attr: float):
        super().__init__()
        self.lambda_obj, self.lambda_attr = lambda_obj, lambda_attr
        self.ce = SoftTargetCrossEntropy()

    def forward(self, obj_logits, attr_logits, obj_targets, attr_targets, weight=None):
        return (self.lambda_obj * self.ce(obj_logits, obj_targets, weight)
                + self.lambda_attr * self.ce(attr_logits, attr_targets, weight))


def create_loss(name: str, **kwargs) -> nn.Module:
    if name == "infonce":
        return ContrastiveLoss(**kwargs)
    raise ValueError(f"loss {name!r} is not built yet (HN-NCE and the FFF sigmoid loss come with the training "
                     "issue); use 'infonce'")
