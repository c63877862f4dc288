"""Training losses, open_clip's call convention: loss(image_features, text_features, logit_scale[, logit_bias]).

Each contrastive loss is the mean over the (local) batch, averaged over the two directions.
Distributed gathering lives apart (``gather_features``); on one process it is the identity.

Distributed convention (the one of open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``, used by
every loss here): features are all-gathered *with gradients*; rank r scores only its own rows (its local
images against all texts, and for the two-directional losses its local texts against all images), and its loss
is the mean over those local rows.  With equal local batches therefore

    mean over ranks of loss_r == the loss of one process holding the whole batch,

and since ``all_gather``'s backward sums the gradients coming from every rank, the gradient that lands on rank
r's local features is d(sum_r loss_r)/dx_r = world_size * dL_full/dx_r.  DDP then *averages* the parameter
gradients over ranks, which cancels that factor: parameter gradients equal the single-process full-batch ones.
(Gradients w.r.t. ``logit_scale``/``logit_bias`` are not gathered: their DDP average is again the full-batch one.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gather_features(image_features, text_features, rank: int = 0, world_size: int = 1):
    """All-gather features across ranks with gradients (identity on one process).

    Either argument may be None (then None is returned for it and nothing is communicated for it).
    The result is ordered by rank, so rank r's rows are ``all[r * n:(r + 1) * n]``.
    """
    if world_size == 1:
        return image_features, text_features
    import torch.distributed.nn as dist_nn

    all_image = None if image_features is None else torch.cat(dist_nn.all_gather(image_features), dim=0)
    all_text = None if text_features is None else torch.cat(dist_nn.all_gather(text_features), dim=0)
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


def _hn_nce_direction(logits: torch.Tensor, labels: torch.Tensor, log_alpha: float, beta: float) -> torch.Tensor:
    """Mean over rows of one HN-NCE direction; row i's positive is column labels[i], every other column a negative.

    loss_i = -log[ e^{l_ii} / (alpha e^{l_ii} + sum_{j!=i} w_ij e^{l_ij}) ],
    w_ij   = (N-1) e^{beta l_ij} / sum_{k!=i} e^{beta l_ik}            (l = s / tau = logit, N = number of columns)

    All in log space: log w_ij = log(N-1) + beta l_ij - LSE_{k!=i}(beta l_ik), and the denominator is one LSE over
    [log alpha + l_ii, (log w_ij + l_ij)_{j!=i}], so nothing is exponentiated raw.
    """
    n_cols = logits.shape[1]
    pos = torch.zeros_like(logits, dtype=torch.bool)
    pos[torch.arange(logits.shape[0], device=logits.device), labels] = True
    pos_logits = logits.gather(1, labels[:, None])                                    # [n, 1]
    if beta == 0:  # uniform weights, exactly 1 each (skip the normalizer: it is log(N-1))
        neg_terms = logits
    else:
        log_norm = torch.logsumexp((beta * logits).masked_fill(pos, -math.inf), dim=1, keepdim=True)
        neg_terms = (1 + beta) * logits + (math.log(n_cols - 1) - log_norm)           # log(w_ij e^{l_ij})
    terms = torch.where(pos, pos_logits + log_alpha, neg_terms)
    return (torch.logsumexp(terms, dim=1) - pos_logits[:, 0]).mean()


class HardNegativeContrastiveLoss(nn.Module):
    """DiHT's HN-NCE (Radenovic et al. 2023; diht-gcc-evaluation-report.md section 3.3).

    For each anchor (an image against all texts, and a text against all images, each direction with its own
    weights) the positive term in the denominator is scaled by ``alpha`` in (0, 1] and each negative j != i by

        w_ij = (n-1) * exp(beta * s_ij / tau) / sum_{k != i} exp(beta * s_ik / tau),   s_ij / tau = logit_ij,

    so the weights of a row sum to n-1 (n = global batch).  alpha=1, beta=0 is InfoNCE (``ContrastiveLoss``).
    Computed in fp32 with log-sum-exp whatever the input dtype; returns the fp32 loss, mean over the batch and
    averaged over the two directions.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, rank: int = 0, world_size: int = 1):
        super().__init__()
        alpha, beta = float(alpha), float(beta)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"HN-NCE alpha must lie in (0, 1] (it scales the positive term), got {alpha}")
        if not (beta >= 0.0 and math.isfinite(beta)):
            raise ValueError(f"HN-NCE beta must be a finite number >= 0 (0 = uniform negative weights), got {beta}")
        self.alpha, self.beta = alpha, beta
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale):
        image_features, text_features = image_features.float(), text_features.float()
        logit_scale = logit_scale.float() if torch.is_tensor(logit_scale) else logit_scale
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        if self.world_size > 1:
            all_image, all_text = gather_features(image_features, text_features, self.rank, self.world_size)
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logits_per_image.T  # one product serves both directions
        if logits_per_image.shape[1] < 2:
            raise ValueError("HN-NCE needs a batch of at least 2 (a batch of 1 has no negatives)")
        log_alpha = math.log(self.alpha)
        return (_hn_nce_direction(logits_per_image, labels, log_alpha, self.beta)
                + _hn_nce_direction(logits_per_text, labels, log_alpha, self.beta)) / 2


class SigmoidLoss(nn.Module):
    """SigLIP's sigmoid loss with FFF's multi-positive labels (Bulat et al.; fff-paper-summary.md).

    loss = -sum_{i,j} logsigmoid(y_ij * (logit_scale * x_i . t_j + logit_bias)) / n,   y = 2M - 1,

    where M [n, n_all] marks the positive pairs of the local images (rows) against all texts (columns);
    ``positives=None`` is the identity (offset by rank), which is exactly open_clip's ``SigLipLoss``.  A full
    [n_all, n_all] matrix (e.g. ``mine_false_negatives`` on gathered features) is also accepted: its rows for this
    rank are used.  With world_size > 1 the texts are all-gathered with gradients (instead of open_clip's
    neighbour exchange), so the mean over ranks equals one process holding the whole batch.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias, positives=None):
        n = image_features.shape[0]
        _, all_text = gather_features(None, text_features, self.rank, self.world_size)
        logits = logit_scale * image_features @ all_text.T
        if logit_bias is not None:
            logits = logits + logit_bias
        if positives is None:
            labels = -torch.ones_like(logits)
            labels[torch.arange(n, device=logits.device), torch.arange(n, device=logits.device) + n * self.rank] = 1
        else:
            positives = torch.as_tensor(positives, device=logits.device).bool()
            if positives.shape[0] == all_text.shape[0] != n:  # full matrix: keep this rank's rows
                positives = positives[n * self.rank:n * (self.rank + 1)]
            if positives.shape != logits.shape:
                raise ValueError(f"positives must be [n, n_all] = {list(logits.shape)} (or [n_all, n_all]), "
                                 f"got {list(positives.shape)}")
            labels = positives.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / n


@torch.no_grad()
def mine_false_negatives(image_features, text_features, it_threshold=None, tt_threshold=None, ii_threshold=None,
                         groups=None) -> torch.Tensor:
    """FFF's on-the-fly positive assignment matrix M [n, n] (bool; no gradients).

    M[i, i] is always positive; (i, j) is also positive when cos(img_i, txt_j) >= it_threshold, or
    cos(txt_i, txt_j) >= tt_threshold, or cos(img_i, img_j) >= ii_threshold (a threshold of None turns its rule
    off), or groups[i] == groups[j] (``groups``: sample/image ids, e.g. several captions of one image).
    For a distributed batch, mine on the gathered features and pass the result (or its local rows) to
    ``SigmoidLoss``.
    """
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"image and text batches differ: {n} vs {text_features.shape[0]}")
    m = torch.eye(n, dtype=torch.bool, device=image_features.device)
    img = F.normalize(image_features.float(), dim=-1) if (it_threshold, ii_threshold) != (None, None) else None
    txt = F.normalize(text_features.float(), dim=-1) if (it_threshold, tt_threshold) != (None, None) else None
    if it_threshold is not None:
        m |= img @ txt.T >= it_threshold
    if tt_threshold is not None:
        m |= txt @ txt.T >= tt_threshold
    if ii_threshold is not None:
        m |= img @ img.T >= ii_threshold
    if groups is not None:
        groups = torch.as_tensor(groups, device=m.device)
        if groups.shape != (n,):
            raise ValueError(f"groups must be a [n] = [{n}] tensor of ids, got {list(groups.shape)}")
        m |= groups[:, None] == groups[None, :]
    return m


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


LOSSES = {
    "infonce": ContrastiveLoss,               # kwargs: rank, world_size
    "hn-nce": HardNegativeContrastiveLoss,    # kwargs: alpha, beta, rank, world_size
    "sigmoid": SigmoidLoss,                   # kwargs: rank, world_size; called with logit_bias (and positives)
}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a contrastive loss by name: one of LOSSES ('infonce', 'hn-nce', 'sigmoid')."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)
