"""Retrieval metrics: ours (chunked ranks) vs CLIP_benchmark's metric code on the same embeddings.

    .venv/bin/python bench/retrieval.py [--n 14000] [--dim 768]

Each method runs in its own process; peak memory is that process's peak RSS above the baseline
of holding the embeddings and the imported modules. CLIP_benchmark's code path is its `evaluate` after encoding: the full
scores matrix, the positive-pair matrix and `batchify(recall_at_k, ...)` for k in (1, 5, 10).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

KS = (1, 5, 10)


def _embeddings(n: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.9 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=-1)
    return img, txt, torch.arange(n)


def _worker(method: str, n: int, dim: int) -> None:
    import torch

    torch.set_num_threads(1)
    if method == "ours":  # imported before the baseline: a module's import is not the metric's memory
        from diht_core.eval.retrieval import retrieval_metrics
    else:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
    img, txt, t2i = _embeddings(n, dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if method == "ours":
        m = retrieval_metrics(img, txt, t2i, ks=KS)
    else:
        scores = txt @ img.t()
        positive = torch.zeros_like(scores, dtype=bool)
        positive[torch.arange(len(scores)), t2i] = True
        m = {}
        for k in KS:
            m[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
            m[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
    seconds = time.perf_counter() - t
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # MiB
    print(json.dumps({"seconds": seconds, "peak_mib": peak,
                      "metrics": {k: v for k, v in m.items() if k.startswith(("image_", "text_"))}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=14000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--worker", choices=["ours", "clip_benchmark"])
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, args.n, args.dim)
    res = {}
    for method in ("clip_benchmark", "ours"):
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--n", str(args.n), "--dim", str(args.dim)],
                             capture_output=True, text=True, check=True)
        res[method] = json.loads(out.stdout.strip().splitlines()[-1])
    same = all(abs(res["ours"]["metrics"][k] - v) < 1e-6 for k, v in res["clip_benchmark"]["metrics"].items())
    print(f"{args.n:,} image-text pairs, dim {args.dim}, recall@{KS} both directions, 1 thread")
    print(f"{'method':<16} {'seconds':>9} {'peak MiB':>10}")
    for method, r in res.items():
        print(f"{method:<16} {r['seconds']:>9.2f} {r['peak_mib']:>10.0f}")
    cb, us = res["clip_benchmark"], res["ours"]
    print(f"speed-up {cb['seconds'] / us['seconds']:.1f}x (goal >= 3x), peak memory {cb['peak_mib'] / max(us['peak_mib'], 1):.0f}x "
          f"less than CLIP_benchmark's (goal >= 50x); identical metrics: {same}")


if __name__ == "__main__":
    main()
