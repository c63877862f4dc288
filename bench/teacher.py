"""Teacher inference throughput: features/s per CPU core and per GPU, at 224 px, of the pipeline's own feature path
(``diht_core.concepts.teacher.features``: uint8 images normalised as the teacher's preprocessing says, the
penultimate features of the frozen teacher).

    .venv/bin/python bench/teacher.py [--models resnet18,vit_h_14] [--batches 1,4] [--seconds 20]

Teachers: ``resnet18`` (timm, the pipeline's default teacher, random weights) and ``torchvision:vit_h_14`` (DiHT's
SWAG ViT-H/14, random weights in torchvision's layout, at 224 px: SWAG's linear-probe size). "per core" runs one
thread (what each CPU rank of ``teacher.launcher: torchrun`` gets); "per GPU" runs on cuda:0 (fp32, as the stage
does) and says "not measured" where torch sees no GPU. Each cell: the best of a few timed passes after a warm-up,
stopping once ``--seconds`` are spent. The "+ decode" column of resnet18 per core adds reading the images from a
webdataset shard (JPEG decode, the teacher's resize and centre crop: ``shard_features``)."""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diht_core.concepts.features import shard_features
from diht_core.concepts.preprocess import pretrained_here
from diht_core.concepts.teacher import build_teacher, features, freeze

SIZE = 224
ARCHS = {"resnet18": "resnet18", "vit_h_14": "torchvision:vit_h_14"}


def _teacher(name: str):
    return freeze(build_teacher(ARCHS[name], vit_size=SIZE))


def _rate(fn, n_images: int, seconds: float) -> float:
    """Images per second: the best timed pass after one warm-up, passes until ``seconds`` are spent (at least 2)."""
    fn()
    best, spent, passes = float("inf"), 0.0, 0
    while passes < 2 or spent < seconds:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, passes = min(best, dt), spent + dt, passes + 1
    return n_images / best


def model_rate(model, device: str, batch: int, seconds: float) -> float:
    pre = pretrained_here(SIZE)
    model.to(device)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)

    def run():
        features(model, pre, images, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return _rate(run, batch, seconds)


def shard_rate(model, batch: int, seconds: float, n: int = 32) -> float:
    """Features/s from a shard of n 320x256 JPEGs (decode, resize, crop, forward), one thread, the cache rewritten
    on each pass."""
    from PIL import Image

    from diht_core.data.shards import encode_jpg, write_shard

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "000000.tar"
        write_shard(shard, [{"__key__": f"{i:06d}", "txt": "a caption",
                             "jpg": encode_jpg(Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)))}
                            for i in range(n)])
        base, cache = hashlib.sha256(b"bench"), Path(tmp) / "cache.npz"
        pre = pretrained_here(SIZE)

        def run():
            cache.unlink(missing_ok=True)
            shard_features(model, pre, shard, cache, base, 10_000_000, batch)
        return _rate(run, n, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,vit_h_14")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
          f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}; {SIZE} px, fp32\n")
    print("| teacher | batch | per core (features/s) | per core + decode | per GPU (features/s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = _teacher(name)
        for batch in batches:
            torch.set_num_threads(1)
            core = model_rate(model, "cpu", batch, args.seconds)
            decode = f"{shard_rate(model, batch, args.seconds):.1f}" if name == "resnet18" else "-"
            per_gpu = f"{model_rate(model, 'cuda:0', batch, args.seconds):.1f}" if gpu else "not measured"
            model.to("cpu")
            print(f"| {name} | {batch} | {core:.2f} | {decode} | {per_gpu} |", flush=True)


if __name__ == "__main__":
    main()
