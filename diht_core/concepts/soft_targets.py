"""Cross-entropy against soft targets: the teacher's concept classifiers and concept distillation share it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a target distribution (concept distillation, teacher classifiers)."""

    def forward(self, logits, target_probs, weight=None):
        loss = -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        if weight is not None:
            return (loss * weight).sum() / weight.sum().clamp_min(1e-12)
        return loss.mean()
