"""Each training mechanism measured against the planted truth of the synthetic world (data/planted.py): the
precision and recall of FFF's mined positives, and the share of HN-NCE's negative weight that falls on true
negatives. Pure functions of one batch (no gradients, no random numbers), run at the loop's log steps only; data
without scene ids gives no measurement.

Pairs are judged by scene_id: images rendered from the same scene description are true positives of each other, a
pair of different scene ids is a true negative, and a pair where either id is NO_SCENE is left out of every count.
"""

from __future__ import annotations

import math

import torch

from ..config import TrainParams
from ..data.planted import NO_SCENE, ratio
from .distributed import DistInfo, all_mean, gather_no_grad
from .losses import _at_least_fp32, _HardNegativeNCE, hn_negative_weights

PREFIX = "mechanisms/"  # the history records' (and MLflow's step series') names: mechanisms/<measure>/<value>
SERIES = {"fff_mining": ("precision", "recall", "mined_pairs", "true_pairs"),
          "hn_true_negative_weight_share": ("i2t", "t2i", "uniform"),
          "hn_hard_negative_weight_share": ("i2t", "t2i", "uniform")}


def scene_pairs(rows: torch.Tensor, cols: torch.Tensor, row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(same, known) [n, N] bool for images with scene ids ``rows`` (the local ones, global index row_offset + i)
    against ``cols`` (all of them): same = a true positive pair (same scene_id, i != j), known = both ids known and
    i != j."""
    known = (rows[:, None] != NO_SCENE) & (cols[None, :] != NO_SCENE)
    own = torch.arange(len(rows), device=rows.device)[:, None] + row_offset == torch.arange(len(cols),
                                                                                             device=rows.device)
    known &= ~own
    return (rows[:, None] == cols[None, :]) & known, known


@torch.no_grad()
def mining_counts(mined: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, row_offset: int = 0,
                  captions_per_image: int = 1) -> torch.Tensor:
    """[true positives, mined pairs, true pairs] of FFF's mined positive matrix ``mined`` [n, N*K] (local images
    against all texts, K captions per image, image-major, as ``mine_false_negatives`` returns it).

    An ordered image pair (i, j), i != j, counts as mined when any caption of image j is a positive of image i; the
    true pairs are those with the same scene_id (``scene_pairs``). Pairs with an unknown scene id are not counted.
    Precision = true positives / mined pairs, recall = true positives / true pairs (``ratio``)."""
    n, k = mined.shape[0], captions_per_image
    pairs = mined.view(n, -1, k).any(2)
    same, known = scene_pairs(rows.to(mined.device), cols.to(mined.device), row_offset)
    pairs &= known
    return torch.stack([(pairs & same).sum(), pairs.sum(), same.sum()]).double()


def _weight_sums(w: torch.Tensor, same: torch.Tensor, known: torch.Tensor, family: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[weight on true negatives, weight on all judged pairs, weight on planted hard negatives (0 without
    ``family``, the same-swap-family mask)] of negative weights ``w`` (anchors along dim 0)."""
    negative = known & ~same
    hard = (w * (negative & family)).sum() if family is not None else w.new_zeros(())
    return torch.stack([(w * negative).sum(), (w * known).sum(), hard]).double()


@torch.no_grad()
def hn_weight_counts(logits: torch.Tensor, labels: torch.Tensor, dim: int, beta: float, anchors: torch.Tensor,
                     others: torch.Tensor, anchor_offset: int = 0) -> torch.Tensor:
    """[weight on true negatives, weight on all judged negatives] of one HN-NCE direction: the negative weights
    w_ij the loss gives (``hn_negative_weights``, each anchor's summing to N-1) of the anchors (scene ids
    ``anchors``, along the dimension that is not ``dim``) against the others (``others``, along ``dim``), summed
    over the pairs with different scene ids and over all pairs with known ids (the anchor's own positive excluded).
    Their ratio is the share of HN-NCE's negative weight that falls on true negatives (pooled over anchors); the
    rest falls on false negatives, images of the anchor's own scene description."""
    w = hn_negative_weights(logits, labels, dim, beta)
    if dim == 0:
        w = w.T
    return _weight_sums(w, *scene_pairs(anchors.to(w.device), others.to(w.device), anchor_offset))[:2]


@torch.no_grad()
def hard_negative_weight_counts(logits: torch.Tensor, labels: torch.Tensor, beta: float, anchors: torch.Tensor,
                                others: torch.Tensor, anchor_families: torch.Tensor, other_families: torch.Tensor,
                                anchor_offset: int = 0) -> torch.Tensor:
    """[weight on planted hard negatives, weight on all true negatives] of HN-NCE's negative weights (anchors along
    dim 0 of ``logits``, as ``hn_weight_counts`` with dim 1): a hard negative is a pair of one swap family
    (``data.planted.swap_family``: the same words with roles or colours swapped) and different scene ids."""
    w = hn_negative_weights(logits, labels, 1, beta)
    family, _ = scene_pairs(anchor_families.to(w.device), other_families.to(w.device), anchor_offset)
    sums = _weight_sums(w, *scene_pairs(anchors.to(w.device), others.to(w.device), anchor_offset), family)
    return sums[[2, 0]]


def hn_pulled_negatives(logits: torch.Tensor, beta: float, alpha: float = 1.0) -> dict:
    """HN-NCE's own gradient on each negative logit of a square batch (positives on the diagonal), both directions:
    ``share`` of the negatives it pulls towards their anchor (a negative gradient: the weights' term, see
    ``losses._HardNegativeNCE``) and ``pull_to_push``, the pull summed over those against the push summed over the
    others (0 with beta = 0: InfoNCE pushes every negative). It is the formula's gradient
    (train.hn_detach_weights false) at these logits, whatever the model was trained with."""
    n = logits.shape[0]
    labels, off = torch.arange(n, device=logits.device), ~torch.eye(n, dtype=torch.bool, device=logits.device)
    pulled = pull = push = 0.0
    for dim in (1, 0):
        lg = _at_least_fp32(logits.detach()).clone().requires_grad_()
        with torch.enable_grad():
            _HardNegativeNCE.apply(lg, labels, dim, math.log(alpha), float(beta)).backward()
        g = lg.grad[off]
        pulled += float((g < 0).sum())
        pull += float(-g[g < 0].sum())
        push += float(g[g > 0].sum())
    return {"share": pulled / (2 * n * (n - 1)), "pull_to_push": pull / push if push > 0 else 0.0}


@torch.no_grad()
def measure(cfg: TrainParams, scene_ids: torch.Tensor | None, img_f, txt_f, logit_scale, mined, info: DistInfo,
            family_ids: torch.Tensor | None = None) -> dict:
    """The mechanism measurements of one training step, flat ({PREFIX + measure/value: number}) for the log record:
    FFF mining when ``mined`` (the positives the sigmoid loss used, this rank's rows) came from the FFF thresholds,
    HN-NCE's true-negative weight share when train.loss is hn-nce (plus ``uniform``: the share under equal weights,
    i.e. the share of true negatives among the negatives) and, with ``family_ids``, the share of its weight on the
    true negatives that falls on planted hard negatives (``uniform``: their share among the true negatives).
    {} without scene ids. Every rank calls it at the same steps (it gathers the ids and features; the counts are
    summed over ranks); a value that is undefined (nothing to judge) is left out."""
    if scene_ids is None:
        return {}
    local = scene_ids.to(img_f.device)
    if float(all_mean((local != NO_SCENE).any().double(), info)) == 0:  # no rank has a planted scene id
        return {}
    cols, offset = gather_no_grad(local, info), info.rank * len(local)
    out = {}
    if mined is not None:
        tp, n_mined, n_true = all_mean(mining_counts(mined, local, cols, offset, cfg.captions_per_image), info)
        out.update({"fff_mining/precision": ratio(tp, n_mined), "fff_mining/recall": ratio(tp, n_true),
                    "fff_mining/mined_pairs": float(n_mined) * info.world_size,
                    "fff_mining/true_pairs": float(n_true) * info.world_size})
    if cfg.loss == "hn-nce":
        img, txt = _at_least_fp32(img_f.detach()), _at_least_fp32(txt_f.detach())
        scale = _at_least_fp32(logit_scale.detach())
        labels = torch.arange(len(img), device=img.device) + offset
        same, known = scene_pairs(local, cols, offset)  # the image pairs are the same in both directions
        family = None
        if family_ids is not None:
            fams = family_ids.to(img.device)
            if float(all_mean((fams != NO_SCENE).any().double(), info)) > 0:  # some rank has a swap family
                family, _ = scene_pairs(fams, gather_no_grad(fams, info), offset)
        for name, anchors, others in (("i2t", img, txt), ("t2i", txt, img)):
            logits = scale * anchors @ gather_no_grad(others, info).T  # local anchors against all: as the loss
            # equal weights (uniform) are the same in both directions: once
            for key, beta in ((name, cfg.hn_beta),) + ((("uniform", 0.0),) if name == "i2t" else ()):
                true_neg, judged, hard = all_mean(
                    _weight_sums(hn_negative_weights(logits, labels, 1, beta), same, known, family), info)
                out[f"hn_true_negative_weight_share/{key}"] = ratio(true_neg, judged)
                if family is not None:
                    out[f"hn_hard_negative_weight_share/{key}"] = ratio(hard, true_neg)
    return {PREFIX + k: v for k, v in out.items() if v is not None}


def mechanisms_block(history: list[dict]) -> dict:
    """The train metrics' ``mechanisms``: {measure: {"steps": [...], value: [...]}} from the log records that carry
    it (None where a value was undefined at that step); {} when nothing was measured."""
    block = {}
    for measure_name, values in SERIES.items():
        names = [f"{PREFIX}{measure_name}/{v}" for v in values]
        rows = [h for h in history if any(n in h for n in names)]
        if rows:
            block[measure_name] = {"steps": [h["step"] for h in rows],
                                   **{v: [h.get(n) for h in rows] for v, n in zip(values, names)}}
    return block


@torch.no_grad()
def threshold_curve(features: torch.Tensor, scene_ids: torch.Tensor, thresholds: list[float],
                    batch_size: int = 128) -> list[dict]:
    """FFF's mining rule cos(f_i, f_j) >= t on unit-norm ``features`` [N, d] (images for its image-image rule, one
    caption an image for its text-text rule) against the planted truth, over every pair i != j of known scene ids
    (a random batch's pairs are a sample of them): per threshold its precision, recall, and the mined and true pairs
    a batch of ``batch_size`` holds on average."""
    known = scene_ids != NO_SCENE
    f, sid = features[known].float(), scene_ids[known]
    n = len(sid)
    sims = f @ f.T
    off = ~torch.eye(n, dtype=torch.bool)
    same = (sid[:, None] == sid[None, :]) & off
    per_batch = batch_size * (batch_size - 1) / max(1, n * (n - 1))  # a batch's share of the ordered pairs
    out = []
    for t in thresholds:
        mined = (sims >= t) & off
        tp, m, s = int((mined & same).sum()), int(mined.sum()), int(same.sum())
        out.append({"threshold": t, "precision": ratio(tp, m), "recall": ratio(tp, s),
                    "mined_pairs_per_batch": m * per_batch, "true_pairs_per_batch": s * per_batch})
    return out
