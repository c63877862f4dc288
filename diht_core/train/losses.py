"""Training losses, open_clip's call convention: loss(image_features, text_features, logit_scale[, logit_bias])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..concepts.soft_targets import SoftTargetCrossEntropy
from ..config import TrainParams, check_hn_nce


def _at_least_fp32(x):
    """fp16/bf16 tensors -> fp32; fp32, fp64 and Python numbers unchanged."""
    return x.float() if torch.is_tensor(x) and x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def gather_features(image_features, text_features, rank: int = 0, world_size: int = 1):
    """All-gather features across ranks with gradients (identity on one process).

    Either argument may be None (then None is returned for it and nothing is communicated for it).
    The result is ordered by rank, so rank r's rows are ``all[r * n:(r + 1) * n]``.

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


def _exp_normalizer_(x: torch.Tensor, dim: int):
    """In place x <- exp(x - max) along dim; returns (sum of the new x, log-sum-exp of the old x) along dim."""
    m = x.amax(dim, keepdim=True)
    x.sub_(m).exp_()
    s = x.sum(dim, keepdim=True)
    return s, m + s.log()


def _negative_softmax(logits, idx, dim: int, beta: float):
    """HN-NCE's negative weights along dim, unnormalised: (q, q_sum, log_norm) with q = exp(beta l - max) (0 at the
    positive, idx), q_sum its sum and log_norm = LSE over the negatives k != p of beta l_k; so w = (N-1) q / q_sum."""
    q = logits * beta                                       # becomes exp(beta l - max), 0 at the positive
    q.scatter_(dim, idx, -math.inf)
    q_sum, log_norm = _exp_normalizer_(q, dim)
    return q, q_sum, log_norm


def hn_negative_weights(logits, labels, dim: int, beta: float) -> torch.Tensor:
    """The weights w_ij that HN-NCE gives each negative of a logits matrix (0 at the positives), as the loss computes
    them: the anchors run along the dimension that is not ``dim``, anchor i's positive sits at labels[i] along
    ``dim``; each anchor's weights sum to N-1 (N = size along dim); beta=0: 1 for every negative."""
    idx = labels.view(-1, 1) if dim == 1 else labels.view(1, -1)
    q, q_sum, _ = _negative_softmax(_at_least_fp32(logits.detach()), idx, dim, float(beta))
    return q * ((logits.shape[dim] - 1) / q_sum)


class _HardNegativeNCE(torch.autograd.Function):
    """Mean over anchors of one HN-NCE direction of a logits matrix, with its analytic gradient.

    The anchors run along the dimension that is not ``dim`` (dim=1: rows are anchors, dim=0: columns are);
    anchor i's positive sits at index labels[i] along ``dim``, everything else along ``dim`` is a negative:

        loss_i = -log[ e^{l_ip} / (alpha e^{l_ip} + sum_{j!=p} w_ij e^{l_ij}) ],
        w_ij   = (N-1) e^{beta l_ij} / sum_{k!=p} e^{beta l_ik}          (l = s / tau = logit, N = size along dim)

    In log space: log w_ij = log(N-1) + beta l_ij - LSE_{k!=p}(beta l_ik), and the denominator is one LSE over
    [log alpha + l_ip, (log w_ij + l_ij)_{j!=p}], so nothing is exponentiated raw.  With q the softmax of
    beta*l over the negatives and r the softmax of those denominator terms, the gradient is

        dloss_i/dl_ip = r_p - 1,    dloss_i/dl_ij = (1 + beta) r_j - beta (1 - r_p) q_j   (j != p).

    The second term comes from the weights' own dependence on l: a negative with (1 + beta) e^{l_ij} <
    beta E_q[e^{l_i.}] has a negative gradient, so the loss pulls it towards the anchor (the easy negatives), while
    the hard ones are pushed harder; the net gradient over the negatives is 1 - r_p, as in InfoNCE's form (the push
    exceeds it by the pull). With ``detach_weights`` the weights are constants (importance weights, no gradient
    through them): dloss_i/dl_ij = r_j, every negative pushed.

    (A fused function rather than autograd over the ops: a third of the passes over the n x N matrix.)
    """

    @staticmethod
    def forward(ctx, logits, labels, dim: int, log_alpha: float, beta: float, detach_weights: bool = False):
        idx = labels.view(-1, 1) if dim == 1 else labels.view(1, -1)
        pos = logits.gather(dim, idx)
        n_neg = logits.shape[dim] - 1
        if beta > 0:
            q, q_sum, log_norm = _negative_softmax(logits, idx, dim, beta)
            r = torch.add(math.log(n_neg) - log_norm, logits, alpha=1 + beta)
        else:                                               # uniform weights, exactly 1 each
            q = q_sum = None
            r = logits.clone()
        r.scatter_(dim, idx, pos + log_alpha)
        r_sum, log_den = _exp_normalizer_(r, dim)           # r becomes exp(terms - max)
        ctx.dim, ctx.beta = dim, 0.0 if detach_weights else beta
        ctx.save_for_backward(idx, r, r_sum, *((None, None) if detach_weights else (q, q_sum)))
        return (log_den - pos).mean()

    @staticmethod
    def backward(ctx, grad_output):
        idx, r, r_sum, q, q_sum = ctx.saved_tensors
        dim, beta = ctx.dim, ctx.beta
        c = grad_output / idx.numel()                       # d mean / d loss_i
        r_pos = r.gather(dim, idx) / r_sum
        grad = r * ((1 + beta) * c / r_sum)
        if q is not None:
            grad.addcmul_(q, (1 - r_pos) * (-beta * c) / q_sum)
        grad.scatter_(dim, idx, (r_pos - 1) * c)
        return grad, None, None, None, None, None


class HardNegativeContrastiveLoss(nn.Module):
    """DiHT's HN-NCE (Radenovic et al. 2023; diht-gcc-evaluation-report.md section 3.3).

    For each anchor (an image against all texts, and a text against all images, each direction with its own
    weights) the positive term in the denominator is scaled by ``alpha`` in (0, 1] and each negative j != i by

        w_ij = (n-1) * exp(beta * s_ij / tau) / sum_{k != i} exp(beta * s_ik / tau),   s_ij / tau = logit_ij,

    so the weights of a row sum to n-1 (n = global batch).  alpha=1, beta=0 is InfoNCE (``ContrastiveLoss``).
    The gradient flows through the weights, as the formula and the code of HCL (Robinson et al.) have it; that
    pulls the easiest negatives closer (see ``_HardNegativeNCE``). ``detach_weights=True`` makes them constants.
    (In the report's text->image weight the sum reads k != j; it is the normaliser of text anchor i's negatives,
    k != i, the mirror of the image->text one, as it must be for those weights to sum to n-1.)
    Mean over the batch, averaged over the two directions.  Computed in (at least) fp32 in log space (log-sum-exp
    of log-weights, no raw exponentials) whatever the input dtype: fp16/bf16 inputs give an fp32 loss.
    """

    def __init__(self, alpha: float = TrainParams().hn_alpha, beta: float = TrainParams().hn_beta, rank: int = 0,
                 world_size: int = 1, detach_weights: bool = TrainParams().hn_detach_weights):
        super().__init__()
        alpha, beta = float(alpha), float(beta)
        check_hn_nce(alpha, beta)
        self.alpha, self.beta, self.detach_weights = alpha, beta, bool(detach_weights)
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale):
        with torch.autocast(image_features.device.type, enabled=False):  # fp32 whatever the caller's autocast
            return self._loss(_at_least_fp32(image_features), _at_least_fp32(text_features),
                              _at_least_fp32(logit_scale))

    def _loss(self, image_features, text_features, logit_scale):
        n = image_features.shape[0]
        if self.world_size * n < 2:
            raise ValueError("HN-NCE needs a batch of at least 2 (a batch of 1 has no negatives)")
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        log_alpha = math.log(self.alpha)
        if self.world_size > 1:  # local loss: local rows against all columns, labels offset by rank
            all_image, all_text = gather_features(image_features, text_features, self.rank, self.world_size)
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            return (_HardNegativeNCE.apply(logits_per_image, labels, 1, log_alpha, self.beta, self.detach_weights)
                    + _HardNegativeNCE.apply(logits_per_text, labels, 1, log_alpha, self.beta,
                                             self.detach_weights)) / 2
        # one product serves both directions: image anchors are its rows, text anchors its columns
        logits = logit_scale * image_features @ text_features.T
        return (_HardNegativeNCE.apply(logits, labels, 1, log_alpha, self.beta, self.detach_weights)
                + _HardNegativeNCE.apply(logits, labels, 0, log_alpha, self.beta, self.detach_weights)) / 2


class _SigmoidPairLoss(torch.autograd.Function):
    """sum_ij -logsigmoid(y_ij z_ij) / n_rows, y = +1 at the positives (flat indices into z) and -1 elsewhere.

    -logsigmoid(y z) = softplus(z) - [y=1] z,  softplus(z) = relu(z) + log(1 + exp(-|z|)),
    d/dz = sigmoid(z) - [y=1].
    (A fused function rather than autograd over F.logsigmoid: one n x N buffer per pass, everything else in
    place; on CPU logsigmoid alone costs as much as the matmul.)
    """

    @staticmethod
    def forward(ctx, logits, pos_flat):
        buf = torch.clamp(logits, min=0)
        total = buf.sum() - logits.reshape(-1)[pos_flat].sum()
        torch.sub(logits, buf, alpha=2, out=buf)            # z - 2 relu(z) = -|z|
        total = total + buf.exp_().add_(1).log_().sum()     # log(1 + e^{-|z|}), in (0, log 2]
        ctx.save_for_backward(logits, pos_flat)
        return total / logits.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        logits, pos_flat = ctx.saved_tensors
        grad = torch.sigmoid(logits)
        grad.view(-1)[pos_flat] -= 1
        return grad.mul_(grad_output / logits.shape[0]), None


class SigmoidLoss(nn.Module):
    """SigLIP's sigmoid loss with FFF's multi-positive labels (Bulat et al.; fff-paper-summary.md).

        loss = -sum_{i,j} logsigmoid(y_ij * (logit_scale * x_i . t_j + logit_bias)) / n,   y = 2M - 1,

    where M [n, n_all] marks the positive pairs of the local images (rows) against all texts (columns);
    ``positives=None`` is the identity (offset by rank), which is exactly open_clip's ``SigLipLoss``.  A full
    [n_all, n_all] matrix (e.g. ``mine_false_negatives`` on gathered features) is also accepted: this rank's rows
    are used.  With world_size > 1 the texts are all-gathered with gradients (instead of open_clip's neighbour
    exchange), so the mean over ranks equals one process holding the whole batch.  Computed in (at least) fp32
    whatever the input dtype.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias, positives=None):
        with torch.autocast(image_features.device.type, enabled=False):  # fp32 whatever the caller's autocast
            image_features, text_features = _at_least_fp32(image_features), _at_least_fp32(text_features)
            logit_scale = _at_least_fp32(logit_scale)
            n = image_features.shape[0]
            _, all_text = gather_features(None, text_features, self.rank, self.world_size)
            n_all = all_text.shape[0]
            if logit_bias is None:
                logits = (logit_scale * image_features) @ all_text.T
            else:  # the bias enters as the GEMM's C term: no extra pass over the n x n_all matrix
                bias = _at_least_fp32(torch.as_tensor(logit_bias, device=image_features.device))
                logits = torch.addmm(bias, logit_scale * image_features, all_text.T)
            if positives is None:
                if n_all != n * self.world_size:
                    raise ValueError(f"{n} images against {n_all} texts: pass the positives matrix (several "
                                     "captions per image)")
                rows = torch.arange(n, device=logits.device)
                pos_flat = rows * n_all + rows + n * self.rank
            else:
                positives = torch.as_tensor(positives, device=logits.device)
                if positives.shape[0] == n_all != n:  # full matrix: keep this rank's rows
                    positives = positives[n * self.rank:n * (self.rank + 1)]
                if positives.shape != logits.shape:
                    raise ValueError(f"positives must be a bool matrix [n, n_all] = {list(logits.shape)} "
                                     f"(or [n_all, n_all]), got {list(positives.shape)}")
                pos_flat = positives.bool().reshape(-1).nonzero().squeeze(1)
            return _SigmoidPairLoss.apply(logits, pos_flat)


def _or_similar_(out, a, b, threshold, block: int = 1024):
    """out |= (a @ b.T >= threshold), block by block (never an n x n float matrix); for b is a (a Gram matrix,
    symmetric) each off-diagonal block is computed once and mirrored."""
    symmetric = b is a
    for i in range(0, a.shape[0], block):
        for j in range(i if symmetric else 0, b.shape[0], block):
            hit = a[i:i + block] @ b[j:j + block].T >= threshold
            out[i:i + block, j:j + block] |= hit
            if symmetric and j != i:
                out[j:j + block, i:i + block] |= hit.T
    return out


@torch.no_grad()
def mine_false_negatives(image_features, text_features, it_threshold=None, tt_threshold=None, ii_threshold=None,
                         groups=None, captions_per_image: int = TrainParams().captions_per_image) -> torch.Tensor:
    """FFF's on-the-fly positive assignment matrix M [n, n*K] (bool; no gradients).

    The texts are K = ``captions_per_image`` captions per image, image-major (text j belongs to image j // K);
    all of an image's own captions are positives.  (i, j) is also positive when cos(img_i, txt_j) >=
    it_threshold, or a caption of image i has cos(txt, txt_j) >= tt_threshold, or cos(img_i, img_{j//K}) >=
    ii_threshold (a threshold of None turns its rule off), or groups[i] == groups[j // K] (``groups``: image ids,
    e.g. one image that appears twice).  For a distributed batch, mine on the gathered features and pass the
    result (or its local rows) to ``SigmoidLoss``.
    """
    n, k = image_features.shape[0], captions_per_image
    if text_features.shape[0] != n * k:
        raise ValueError(f"expected {n} x {k} = {n * k} texts for {n} images, got {text_features.shape[0]}")
    dev = image_features.device
    owner = torch.arange(n * k, device=dev) // k
    m = owner[None, :] == torch.arange(n, device=dev)[:, None]
    img = F.normalize(_at_least_fp32(image_features), dim=-1) if (it_threshold, ii_threshold) != (None, None) else None
    txt = F.normalize(_at_least_fp32(text_features), dim=-1) if (it_threshold, tt_threshold) != (None, None) else None
    if it_threshold is not None:
        _or_similar_(m, img, txt, it_threshold)
    if tt_threshold is not None:
        tt = _or_similar_(torch.zeros(n * k, n * k, dtype=torch.bool, device=dev), txt, txt, tt_threshold)
        m |= tt.view(n, k, n * k).any(1)
    if ii_threshold is not None:
        ii = _or_similar_(torch.zeros(n, n, dtype=torch.bool, device=dev), img, img, ii_threshold)
        m |= ii[:, owner]
    if groups is not None:
        groups = torch.as_tensor(groups, device=dev)
        if groups.shape != (n,):
            raise ValueError(f"groups must be a [n] = [{n}] tensor of ids, got {list(groups.shape)}")
        m |= groups[:, None] == groups[owner][None, :]
    return m


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
    "hn-nce": HardNegativeContrastiveLoss,    # kwargs: alpha, beta, rank, world_size, detach_weights
    "sigmoid": SigmoidLoss,                   # kwargs: rank, world_size; called with logit_bias (and positives)
}


def create_loss(name: str | TrainParams, **kwargs) -> nn.Module:
    """A contrastive loss by name, one of LOSSES ('infonce', 'hn-nce', 'sigmoid'), or from the `train` params
    (``train.loss``, with ``train.hn_alpha`` / ``hn_beta`` / ``hn_detach_weights`` for HN-NCE); kwargs: rank, world_size, ...

    Each contrastive loss is the mean over the (local) batch, averaged over the two directions; distributed
    gathering lives apart (``gather_features``, the identity on one process)."""
    if isinstance(name, TrainParams):
        if name.loss == "hn-nce":
            kwargs = {"alpha": name.hn_alpha, "beta": name.hn_beta, "detach_weights": name.hn_detach_weights,
                      **kwargs}
        name = name.loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)
