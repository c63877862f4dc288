"""Loss throughput: forward+backward time of our losses against open_clip's ClipLoss, fp32 (CPU or GPU).

    .venv/bin/python bench/losses.py [--batches 256 512 1024 2048 4096] [--dim 512] [--threads 1] [--device cuda]

One thread by default (like bench/cat_filter.py: numbers per core): on a shared machine multi-threaded timings
are noise, every idle-waiting barrier of a parallel op stalls when another process holds the other core.

Same random unit-norm features for every loss (texts correlated with their images); median of a few
interleaved repeats (fewer for big batches).
Goal: each of ours within 1.2x of ClipLoss.  "sigmoid+mining" includes ``mine_false_negatives`` (all three
similarity rules on) before the loss, as a training step would run it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from open_clip.loss import ClipLoss  # noqa: E402

from diht_core.train.losses import HardNegativeContrastiveLoss, SigmoidLoss, mine_false_negatives  # noqa: E402

GOAL = 1.2


def _step(fn, img, txt, scale, bias):
    img = img.detach().requires_grad_(True)
    txt = txt.detach().requires_grad_(True)
    scale = scale.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    _sync(img)
    t = time.perf_counter()
    fn(img, txt, scale, bias).backward()
    _sync(img)
    return time.perf_counter() - t


def _sync(x):
    if x.is_cuda:
        torch.cuda.synchronize()


def _medians(fns, img, txt, scale, bias, repeats):
    """Median time of each fn; the repeats are interleaved (fn1, fn2, fn3, fn1, ...) so that a busy machine
    slows every loss alike."""
    for fn in fns:  # warm-up
        _step(fn, img, txt, scale, bias)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(_step(fn, img, txt, scale, bias))
    return [statistics.median(ts) for ts in times]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    clip = ClipLoss()
    hn = HardNegativeContrastiveLoss(alpha=1.0, beta=0.5)
    sig = SigmoidLoss()

    def sigmoid_mined(img, txt, scale, bias):
        m = mine_false_negatives(img, txt, it_threshold=0.9, tt_threshold=0.9, ii_threshold=0.9)
        return sig(img, txt, scale, bias, positives=m)

    losses = [
        ("open_clip ClipLoss", lambda i, t, s, b: clip(i, t, s)),
        ("HN-NCE (beta=0.5)", lambda i, t, s, b: hn(i, t, s)),
        ("sigmoid", lambda i, t, s, b: sig(i, t, s, b)),
        ("sigmoid+mining", sigmoid_mined),
    ]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"forward+backward, fp32, {where}, dim {args.dim}; median ms; "
          f"goal: ratio to ClipLoss <= {GOAL}x (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    header = f"{'batch':>6} {'reps':>4} | " + " | ".join(f"{name:>20}" for name, _ in losses) + \
        " | " + " | ".join(f"{name.split(' ')[0] + ' ratio':>14}" for name, _ in losses[1:])
    print(header)
    print("-" * len(header))
    worst = 0.0
    for n in args.batches:
        g = torch.Generator().manual_seed(n)
        img = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1).to(args.device)
        txt = F.normalize(img + 0.7 * torch.randn(n, args.dim, generator=g).to(args.device), dim=-1)
        scale, bias = torch.tensor(100.0, device=args.device), torch.tensor(-10.0, device=args.device)
        repeats = 15 if n <= 512 else 7 if n <= 1024 else 5 if n <= 2048 else 3
        times = _medians([fn for _, fn in losses], img, txt, scale, bias, repeats)
        ratios = [t / times[0] for t in times[1:]]
        worst = max(worst, *ratios)
        print(f"{n:>6} {repeats:>4} | " + " | ".join(f"{1e3 * t:>20.1f}" for t in times) + " | "
              + " | ".join(f"{r:>13.2f}x" for r in ratios))
    print(f"goal <= {GOAL}x: {'met' if worst <= GOAL else 'NOT met'} (worst ratio {worst:.2f}x)")


if __name__ == "__main__":
    main()
