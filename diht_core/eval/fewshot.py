"""Few-shot adaptation (DiHT paper): PGD probe that stays near the zero-shot head, vs a scratch probe."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import BenchmarkParams, FewshotParams
from ..data.eval_datasets import _read_lines
from ..data.shards import Faults
from ..models import image_size
from .encoders import encode_images, text_encoder
from .fewshot_pool import PoolFeatures, kshot_indices, needed_indices, split_labels, stream_features
from .zeroshot import build_classifier

SCALE = 100.0


@contextmanager
def _one_thread():
    """Tiny full-batch problems: intra-op threads only add sync cost (and stall badly on busy CPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@_one_thread()
def _train(x, y, W_init, W0, deltas, delta_bs, wds, steps, lr):
    """Full-batch Adam on G probes at once (one per grid entry; Adam is elementwise so they don't interact).

    deltas/delta_bs None: no projection. wds: per-probe L2 penalty 0.5 * wd * ||W||^2 (bias not decayed).
    Returns W [G, d, C], b [G, C].
    """
    G = len(wds)
    x = F.normalize(x.float(), dim=-1)
    y = torch.as_tensor(y, device=x.device).long()
    n, C = len(x), W_init.shape[1]
    W = W_init.float().expand(G, -1, -1).clone().requires_grad_(True)
    b = torch.zeros(G, C, device=x.device, requires_grad=True)
    wd = torch.as_tensor(wds, dtype=torch.float32, device=x.device)[:, None, None]
    opt = torch.optim.Adam([W, b], lr=lr)
    if deltas is not None:
        W0 = W0.float()
        dW = torch.as_tensor(deltas, dtype=torch.float32, device=x.device)
        db = torch.as_tensor(delta_bs, dtype=torch.float32, device=x.device)
    for _ in range(steps):
        logits = SCALE * x @ W + b[:, None, :]  # [G, n, C]
        loss = F.cross_entropy(logits.reshape(G * n, C), y.repeat(G), reduction="sum") / n
        loss = loss + 0.5 * (wd * W.square()).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if deltas is not None:
            with torch.no_grad():  # project onto the L2 balls around W0 and 0
                D = W - W0
                nD = D.flatten(1).norm(dim=1)
                s = torch.where(nD > dW, dW / nD.clamp_min(1e-30), torch.ones_like(nD))
                W.copy_(W0 + D * s[:, None, None])
                nb = b.norm(dim=1)
                b.mul_(torch.where(nb > db, db / nb.clamp_min(1e-30), torch.ones_like(nb))[:, None])
    return W.detach(), b.detach()


def pgd_probe(train_x, train_y, W0, delta, delta_b, f: FewshotParams = FewshotParams()):
    """Linear probe initialised at W0, b=0, projected after every Adam step (f.steps at f.lr). delta=0 gives
    exactly W0.

    Logits are 100 * normalize(x) @ W + b, so W = W0 (the zero-shot classifier), b = 0 reproduces
    zero-shot predictions exactly. PGD keeps ||W - W0||_F <= delta and ||b||_2 <= delta_b.
    """
    W, b = _train(train_x, train_y, W0, W0, [delta], [delta_b], [0.0], f.steps, f.lr)
    return W[0], b[0]


def scratch_probe(train_x, train_y, weight_decay, f: FewshotParams = FewshotParams(), num_classes=None):
    """Logistic-regression baseline from zero init (deterministic, f.steps at f.lr) with L2 weight decay on W."""
    C = num_classes or int(torch.as_tensor(train_y).max()) + 1
    W_init = torch.zeros(train_x.shape[1], C, device=train_x.device)
    W, b = _train(train_x, train_y, W_init, None, None, None, [weight_decay], f.steps, f.lr)
    return W[0], b[0]


@torch.no_grad()
def _accs(x, y, W, b) -> torch.Tensor:
    """Accuracy of each of G probes (W [G, d, C], b [G, C])."""
    logits = SCALE * F.normalize(x.float(), dim=-1) @ W + b[:, None, :]
    return (logits.argmax(dim=-1) == torch.as_tensor(y, device=x.device).long()).double().mean(dim=1)


def probe_accuracy(x, y, W, b) -> float:
    """Top-1 accuracy of logits = 100 * normalize(x) @ W + b."""
    return _accs(x, y, W[None], torch.as_tensor(b, dtype=torch.float32, device=x.device).reshape(1, -1)).item()


def run_fewshot(train_x, train_y, val_x, val_y, test_x, test_y, W0, f: FewshotParams = FewshotParams()) -> dict:
    """Few-shot curve: per k of f.shots and seed of range(f.seeds), pick (delta, delta_b) from the grid
    f.deltas x f.delta_bs / the weight decay of f.weight_decays on val, score on test (f.steps at f.lr).

    best_delta / best_delta_b / best_weight_decay are the per-seed choices (val ties go to the earliest grid
    entry); std is the population std over seeds.
    """
    shots, seeds, weight_decays, steps, lr = f.shots, list(range(f.seeds)), f.weight_decays, f.steps, f.lr
    grid_w = [d for d in f.deltas for _ in f.delta_bs]
    grid_b = [db for _ in f.deltas for db in f.delta_bs]
    W0 = W0.float()
    C = W0.shape[1]
    curve = []
    for k in shots:
        if k == 0:  # no training data: the prompt-initialised probe is the zero-shot classifier itself
            zs = probe_accuracy(test_x, test_y, W0, torch.zeros(C))
            scratch0 = probe_accuracy(test_x, test_y, torch.zeros_like(W0), torch.zeros(C))
            curve.append({"k": 0, "pgd_mean": zs, "pgd_std": 0.0, "scratch_mean": scratch0, "scratch_std": 0.0,
                          "best_delta": [0.0] * len(seeds), "best_delta_b": [0.0] * len(seeds),
                          "best_weight_decay": [None] * len(seeds)})
            continue
        pgd, scr, bd, bdb, bw = [], [], [], [], []
        for seed in seeds:
            idx = kshot_indices(train_y, k, seed)
            x, y = train_x[idx], torch.as_tensor(train_y)[idx]
            W, b = _train(x, y, W0, W0, grid_w, grid_b, [0.0] * len(grid_w), steps, lr)
            i = int(_accs(val_x, val_y, W, b).argmax())
            pgd.append(_accs(test_x, test_y, W[i:i + 1], b[i:i + 1]).item())
            bd.append(float(grid_w[i]))
            bdb.append(float(grid_b[i]))
            W, b = _train(x, y, torch.zeros(W0.shape[0], C), None, None, None, weight_decays, steps, lr)
            i = int(_accs(val_x, val_y, W, b).argmax())
            scr.append(_accs(test_x, test_y, W[i:i + 1], b[i:i + 1]).item())
            bw.append(float(weight_decays[i]))
        curve.append({"k": k, "pgd_mean": float(np.mean(pgd)), "pgd_std": float(np.std(pgd)),
                      "scratch_mean": float(np.mean(scr)), "scratch_std": float(np.std(scr)),
                      "best_delta": bd, "best_delta_b": bdb, "best_weight_decay": bw})
    return {"zero_shot": probe_accuracy(test_x, test_y, W0, torch.zeros(C)), "curve": curve}


def split_features(model, task_dir: str | Path, split: str, size: int, batch_size: int, max_pixels: int | None,
                   faults: Faults, shots=None, seeds: int = 0):
    """(unit-norm image embeddings, labels of the pool) of a synthetic classification split, streamed from its shards
    (split_labels, stream_features); the pool is the split's good samples, the bad ones counted in faults. shots None
    embeds the whole pool (a tensor), else only the pool indices some k of shots and seed picks (PoolFeatures)."""
    labels, positions = split_labels(Path(task_dir) / split, max_pixels, faults)
    keep = None if shots is None else needed_indices(labels, shots, seeds)
    x = stream_features(Path(task_dir) / split, positions if keep is None else positions[keep],
                        lambda imgs: encode_images(model, imgs, batch_size), size, max_pixels, batch_size)
    return (x if keep is None else PoolFeatures(keep, x)), labels


def fewshot_curve(model, tokenizer, task_dir: str | Path, f: FewshotParams,
                  batch_size: int = BenchmarkParams().batch_size,
                  max_pixels: int | None = None) -> dict:
    """run_fewshot with the grids of f on the train / val / test splits of a synthetic classification task.

    The train pool is streamed: its labels are read first, then only the samples some k of f.shots and seed picks
    are decoded and embedded (at most batch_size images at a time); val and test are embedded batch by batch. Bad
    samples and cut shards of each split are skipped (never picked) and reported under "skipped": split ->
    skipped_samples, skipped_by_reason, truncated_shards (only splits with any; no key when there are none).
    """
    size = image_size(model)
    task_dir = Path(task_dir)
    W0 = build_classifier(text_encoder(model, tokenizer, batch_size), _read_lines(task_dir / "classnames.txt"),
                          _read_lines(task_dir / "zeroshot_classification_templates.txt"))
    faults = {split: Faults() for split in ("train", "val", "test")}
    tr_x, tr_y = split_features(model, task_dir, "train", size, batch_size, max_pixels, faults["train"], f.shots,
                                f.seeds)
    va_x, va_y = split_features(model, task_dir, "val", size, batch_size, max_pixels, faults["val"])
    te_x, te_y = split_features(model, task_dir, "test", size, batch_size, max_pixels, faults["test"])
    res = run_fewshot(tr_x, tr_y, va_x, va_y, te_x, te_y, W0, f)
    skipped = {split: fl.report() for split, fl in faults.items() if fl.report()}
    return {**res, "skipped": skipped} if skipped else res
