"""Train-step throughput: our trainer (diht_core.train.train) against open_clip's own loop
(open_clip_train.train.train_one_epoch) on the same model, batch, precision, threads and data.

Both get the same in-memory batches already on the device (uint8 images for ours, normalised floats for
open_clip's, which is what their loaders hand over), InfoNCE, AdamW and a warmup+cosine schedule, no
checkpointing. Each side first runs warm-up steps (ours: the first steps of the same run, timed from the
log after them; open_clip's: a warm-up epoch), then the timed ones.  The runs alternate and each figure is
the best of `--repeats`.  --steps must be a multiple of --warmup (ours logs, i.e. syncs, every --warmup steps).

    python bench/train_step.py                       # CPU: the tiny model and ViT-B-32
    python bench/train_step.py --device cuda --configs ViT-B-32:256:bf16 ViT-B-32:512:bf16
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diht_core.models import create_model, image_size  # noqa: E402
from diht_core.data.images import MEAN, STD  # noqa: E402
from diht_core.config import TrainParams  # noqa: E402
from diht_core.train import TrainSet, train  # noqa: E402


def make_data(n: int, size: int, ctx: int, device) -> TrainSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    tokens = torch.randint(1, 40000, (n, ctx), generator=g)
    return TrainSet([str(i) for i in range(n)], images.to(device), tokens.to(device), [[i] for i in range(n)])


def ours(name, data, batch, steps, warmup, precision, device, compile=False) -> float:
    """One run of warmup + steps steps; timed between the log (a device sync) after the warm-up and the last."""
    torch.manual_seed(0)
    model, _, _ = create_model(name)
    model.to(device)
    stamps = {}
    cfg = TrainParams(seed=0, model=name, steps=warmup + steps, batch_size=batch, warmup_steps=1, precision=precision,
                      checkpoint_every=10**9, log_every=warmup, compile=compile)
    with tempfile.TemporaryDirectory() as d:
        train(model, data, cfg, d, log_fn=lambda step, rec: stamps.setdefault(step, time.perf_counter()))
    return steps * batch / (stamps[warmup + steps] - stamps[warmup])


class _Loader:
    """What open_clip_train's loop reads: an iterable of (images, texts) with num_batches / num_samples."""

    def __init__(self, images, texts, batch, steps):
        self.images, self.texts, self.batch, self.num_batches = images, texts, batch, steps
        self.num_samples = batch * steps

    def __iter__(self):
        n = len(self.images)
        for s in range(self.num_batches):
            idx = torch.arange(s * self.batch, (s + 1) * self.batch, device=self.images.device) % n
            yield self.images[idx], self.texts[idx]


def open_clip_loop(name, data, batch, steps, warmup, precision, device) -> float:
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    torch.manual_seed(0)
    model, _, _ = create_model(name, output_dict=True)
    model.to(device)
    images = ((data.images.float() / 255 - MEAN.to(device)) / STD.to(device))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    args = SimpleNamespace(device=str(device), precision={"fp32": "fp32", "bf16": "amp_bf16"}[precision],
                           distill=False, accum_freq=1, skip_scheduler=False, grad_clip_norm=None, horovod=False,
                           log_every_n_steps=1000, batch_size=batch, world_size=1, rank=0, local_rank=0,
                           wandb=False, distributed=False, val_frequency=0, epochs=1, save_logs=False,
                           checkpoint_path=None)
    loss = open_clip.ClipLoss()

    def run(n):
        loader = _Loader(images, data.tokens, batch, n)
        info = SimpleNamespace(dataloader=loader, set_epoch=lambda e: None)
        sched = cosine_lr(opt, 1e-3, 1, n)
        _sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, {"train": info}, loss, 0, opt, None, sched, None, args)
        _sync(device)
        return time.perf_counter() - t0

    run(warmup)
    return steps * batch / run(steps)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="+", default=["diht-tiny-vit:128:fp32", "ViT-B-32:32:fp32"],
                    help="model:batch:precision (fp32 | bf16)[:compile] (compile: ours with train.compile)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup")
    logging.disable(logging.WARNING)  # open_clip_train logs every step it is asked to; random-init warnings
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name_dev}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up, "
          f"best of {args.repeats}")
    print(f"| model | batch | precision | ours (samples/s) | open_clip_train (samples/s) | ours / open_clip |")
    print("|---|---:|---|---:|---:|---:|")
    for spec in args.configs:
        name, batch, precision, *flags = spec.split(":")
        batch, compile = int(batch), "compile" in flags
        model, _, _ = create_model(name)
        ctx = model.context_length
        data = make_data(max(batch * 2, 256), image_size(model), ctx, device)
        del model
        a, b = [], []
        for _ in range(args.repeats):
            a.append(ours(name, data, batch, args.steps, args.warmup, precision, device, compile))
            b.append(open_clip_loop(name, data, batch, args.steps, args.warmup, precision, device))
        print(f"| {name} | {batch} | {precision}{' (ours compiled)' if compile else ''} | {max(a):,.0f} | {max(b):,.0f} | {max(a) / max(b):.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
