"""A small, direct trainer for open_clip models: InfoNCE + optional concept distillation.

Data order and the learning rate are functions of the global step, so a run resumed
from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .data.images import MEAN, STD, image_to_uint8, normalize_images, to_device  # noqa: F401 (re-exported)
from .data.shards import decode_image, read_samples, shard_paths
from .distributed import (DistInfo, all_mean, barrier, broadcast_object, gather_no_grad, load_state_dicts, no_sync, replicated_params,
                          state_dicts, sync_replicated_grads, wrap_model)
from .losses import ConceptDistillationLoss, create_loss, mine_false_negatives
from .models import ConceptHeads

@dataclass(frozen=True)
class TrainConfig:
    model: str = "diht-tiny-vit"
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    loss: str = "infonce"
    hn_alpha: float = 1.0
    hn_beta: float = 0.0
    fff_it_threshold: float | None = None
    fff_tt_threshold: float | None = None
    fff_ii_threshold: float | None = None
    fff_mining_start: int = 0        # FFF mining from this global step on (before: own captions only)
    precision: str = "fp32"          # fp32 | bf16 | fp16 (autocast; fp16 with a grad scaler on GPU)
    grad_checkpointing: bool = False
    accum_steps: int = 1             # micro-batches per step; features are cached so the loss sees the whole batch
    captions_per_image: int = 1      # sigmoid: K captions per image in a batch, all positives (FFF)
    compile: bool = False            # torch.compile the (wrapped) model
    strategy: str = "ddp"            # ddp | fsdp, under torchrun
    lambda_obj: float = 0.0
    lambda_attr: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainSet:
    keys: list[str]
    images: torch.Tensor            # uint8 [N, 3, H, W]
    tokens: torch.Tensor            # int64 [T, ctx], all captions
    caption_index: list[list[int]]  # per image, rows of `tokens`
    obj_targets: torch.Tensor | None = None   # float [N, V_obj] (dense from sparse top-k)
    attr_targets: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self):
        return len(self.keys)

    def batches(self, cfg: "TrainConfig", start: int, rank: int = 0, world_size: int = 1, position=None):
        """This rank's share of the batch of every global step from `start` on: a pure function of
        (seed, step). With K = cfg.captions_per_image the texts are K captions per image, image-major."""
        k = cfg.captions_per_image
        for step in range(start, cfg.steps):
            full = batch_indices(step, len(self), cfg.batch_size, cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            rows = []
            for i in full.tolist():
                caps = self.caption_index[i]
                order = torch.randperm(len(caps), generator=g).tolist() if k > 1 else \
                    [int(torch.randint(len(caps), (1,), generator=g))]
                rows.append([caps[order[j % len(order)]] for j in range(k)])  # fewer captions: cycle them
            idx, rows = full.chunk(world_size)[rank], list(_chunks(rows, world_size))[rank]
            rows = torch.tensor([r for row in rows for r in row])
            batch = {"image": self.images[to_device(idx, self.images.device)],
                     "text": self.tokens[to_device(rows, self.tokens.device)]}
            if self.obj_targets is not None:
                batch["obj"], batch["attr"] = self.obj_targets[idx], self.attr_targets[idx]
            yield batch

    def digest(self) -> str:
        """Fingerprint of the training data (images, captions, pseudo-labels), for safe resumes."""
        h = hashlib.sha256("\n".join(self.keys).encode())
        for t in (self.images, self.tokens, self.obj_targets, self.attr_targets):
            if t is not None:
                h.update(t.contiguous().cpu().numpy().tobytes())
        h.update(json.dumps(self.caption_index).encode())
        return h.hexdigest()[:16]


def _chunks(items: list, parts: int):
    """Split like torch.chunk: equal parts of ceil(n / parts)."""
    size = -(-len(items) // parts)
    return (items[i:i + size] for i in range(0, len(items), size))


def load_train_set(shard_dir: str | Path, image_size: int, tokenizer, pseudo_labels: dict | None = None,
                   missing: str = "error", max_captions: int = 8) -> TrainSet:
    """Decode the (filtered) shards once into memory and join pseudo-labels by key."""
    keys, images, caps, index = [], [], [], []
    pl_rows = []  # row of each kept sample in the pseudo-label arrays
    skipped = 0
    paths = shard_paths(shard_dir)
    if not paths:
        raise FileNotFoundError(f"no shards in {shard_dir}")
    for path in paths:
        for s in read_samples(path):
            key = s["key"]
            if pseudo_labels is not None and key not in pseudo_labels["index"]:
                if missing == "error":
                    raise KeyError(f"no pseudo-label for sample key {key!r} (pseudo_labels.missing=error)")
                skipped += 1
                continue
            try:
                img = decode_image(s["image_bytes"])
            except (ValueError, KeyError):
                skipped += 1
                continue
            captions = (s.get("json") or {}).get("captions") or [s.get("txt", "")]
            keys.append(key)
            images.append(image_to_uint8(img, image_size))
            index.append(list(range(len(caps), len(caps) + len(captions[:max_captions]))))
            caps.extend(captions[:max_captions])
            if pseudo_labels is not None:
                pl_rows.append(pseudo_labels["index"][key])
    tokens = tokenizer(caps)
    ts = TrainSet(keys, torch.stack(images), tokens, index, skipped=skipped)
    if pseudo_labels is not None:
        rows = torch.tensor(pl_rows, dtype=torch.long)
        ts.obj_targets = pseudo_labels["objects"][rows]
        ts.attr_targets = pseudo_labels["attributes"][rows]
    return ts


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay, a function of the global step only."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the batch at a global step: epoch-wise permutations seeded by (seed, epoch)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
    return torch.tensor(out)


def _atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StreamingData:
    """Training batches streamed from shards by a webdataset loader (see data/loader.py), epoch after epoch.

    ``make_loader(seed, batch_size)`` returns one epoch's stream, a deterministic function of its seed; with
    ``epoch_steps`` (resampled shards, an endless stream) an epoch is that many batches.  ``position`` (epoch,
    batches consumed) goes into checkpoints: a resumed run replays the interrupted epoch's stream up to it and
    continues with the very next batch.
    """

    def __init__(self, make_loader: Callable[[int, int], object], fingerprint: str, distill: bool,
                 epoch_steps: int | None = None):
        self.make_loader, self.fingerprint, self.has_targets = make_loader, fingerprint, distill
        self.epoch_steps = epoch_steps
        self.skipped = 0
        self.position = (0, 0)

    def digest(self) -> str:
        return self.fingerprint

    def batches(self, cfg: "TrainConfig", start: int, rank: int = 0, world_size: int = 1, position=None):
        if world_size > 1 and self.epoch_steps is None:
            raise ValueError("streaming on several ranks needs resampled shards (train.resample: true)")
        epoch, offset = position if position is not None else (0, 0)
        step = start
        while step < cfg.steps:
            produced = 0
            for i, batch in enumerate(self.make_loader(cfg.seed * 100_003 + epoch, cfg.batch_size // world_size)):
                if self.epoch_steps is not None and i >= self.epoch_steps:
                    break
                if i < offset:  # replaying the interrupted epoch up to the checkpoint
                    continue
                self.position = (epoch, i + 1)
                self.skipped += batch["skipped"]
                if len(batch["key"]) < 2:
                    continue
                produced += 1
                yield batch
                step += 1
                if step >= cfg.steps:
                    return
            if produced == 0 and offset == 0:
                raise RuntimeError(f"epoch {epoch} of the streaming loader produced no batch (all samples skipped?)")
            epoch, offset = epoch + 1, 0


def _adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, decoupled weight decay on matrices only. Scalars get a group of their own: under FSDP they are
    plain tensors among DTensors, and a foreach step cannot mix the two."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim == 0], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def train(model, data, cfg: TrainConfig, checkpoint_dir: str | Path,
          log_fn: Callable[[int, dict], None] | None = None, heads: ConceptHeads | None = None,
          dist: DistInfo | None = None) -> dict:
    """Train in place on a TrainSet (in memory) or StreamingData; resume from checkpoint_dir/latest.pt
    when it matches cfg and the data. Under torchrun pass ``init_distributed()``: each rank trains on its share
    of every global batch (DDP or FSDP by cfg.strategy). Returns summary metrics (rank 0 logs and saves)."""
    info = dist or DistInfo(device=next(model.parameters()).device)
    device, k = info.device, cfg.captions_per_image
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the world size {info.world_size}")
    if k > 1 and cfg.loss != "sigmoid":
        raise ValueError(f"captions_per_image={k} needs the sigmoid loss (several positives per image)")
    if cfg.loss == "sigmoid" and getattr(model, "logit_bias", None) is None:
        raise ValueError("the sigmoid loss needs a model with a learnable logit_bias "
                         "(create_model(..., init_logit_bias=-10))")
    model.to(device)
    if heads is not None:
        heads.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    wrapped = wrap_model(model, cfg.strategy, info)
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    ckpt_path = Path(checkpoint_dir) / "latest.pt"
    opt = _adamw(model.parameters(), cfg)
    opt_heads = _adamw(heads.parameters(), cfg) if heads is not None else None  # apart: FSDP's state dicts
    optimizers = [o for o in (opt, opt_heads) if o is not None]                 # know the model's params only
    replicated = replicated_params(model, cfg.strategy, heads.parameters() if heads is not None else ())
    hn = {"alpha": cfg.hn_alpha, "beta": cfg.hn_beta} if cfg.loss == "hn-nce" else {}
    contrastive = create_loss(cfg.loss, rank=info.rank, world_size=info.world_size, **hn)
    mining = any(t is not None for t in (cfg.fff_it_threshold, cfg.fff_tt_threshold, cfg.fff_ii_threshold))
    distill = ConceptDistillationLoss(cfg.lambda_obj, cfg.lambda_attr)
    has_targets = getattr(data, "has_targets", getattr(data, "obj_targets", None) is not None)
    use_distill = heads is not None and has_targets and (cfg.lambda_obj > 0 or cfg.lambda_attr > 0)
    start, history, position = 0, [], None
    digest = f"{cfg.digest()}-{data.digest()}"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    ck = None
    if info.is_main and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        ck = ck if ck.get("digest") == digest else None  # same config and same data: continue that run
    ck = broadcast_object(ck, info)  # rank 0 decides (and reads) for every rank: one resume point
    if ck is not None:
        load_state_dicts(model, opt, ck["model"], ck["optimizer"], cfg.strategy, info)
        if heads is not None and ck.get("heads") is not None:
            heads.load_state_dict(ck["heads"])
            opt_heads.load_state_dict(ck["optimizer_heads"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, history, position = ck["step"], ck.get("history", []), ck.get("data_position")
        del ck
    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", mininterval=2.0, disable=not info.is_main)

    def forward(images, text):
        images = normalize_images(to_device(images, device))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return forward_model(images, to_device(text, device))

    def text_rows(c):  # the K captions of the images in c (image-major)
        return (c[:, None] * k + torch.arange(k)).reshape(-1) if k > 1 and torch.is_tensor(c) else c

    def mine(img_f, txt_f, step):  # FFF: positives mined on the gathered batch, this rank's rows (None: identity)
        on = mining and step >= cfg.fff_mining_start
        if cfg.loss != "sigmoid" or not (on or k > 1):
            return None
        thresholds = (cfg.fff_it_threshold, cfg.fff_tt_threshold, cfg.fff_ii_threshold) if on else (None,) * 3
        m = mine_false_negatives(gather_no_grad(img_f, info), gather_no_grad(txt_f, info), *thresholds,
                                 captions_per_image=k)
        return m[info.rank * len(img_f):(info.rank + 1) * len(img_f)]

    def contrastive_loss(img_f, txt_f, out, positives):
        if cfg.loss != "sigmoid":
            return contrastive(img_f, txt_f, out[2])
        return contrastive(img_f, txt_f, out[2], out[3], positives=positives)

    for step, batch in enumerate(data.batches(cfg, start, info.rank, info.world_size, position), start=start):
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for o in optimizers:
            for g in o.param_groups:
                g["lr"] = lr
            o.zero_grad(set_to_none=True)
        n = len(batch["image"])
        chunks = torch.arange(n).chunk(max(1, min(cfg.accum_steps, n)))
        if len(chunks) == 1:
            cached, chunks = None, [slice(None)]  # the whole batch: no index copies
        else:  # open_clip-style accumulation: every micro-batch's loss sees the whole batch's features
            with torch.no_grad():
                cached = [forward(batch["image"][c], batch["text"][text_rows(c)])[:2] for c in chunks]
            positives = mine(torch.cat([f[0] for f in cached]), torch.cat([f[1] for f in cached]), step)  # once
        loss_c_total, loss_d_total = 0.0, 0.0
        for j, c in enumerate(chunks):
            last = j == len(chunks) - 1
            with no_sync(wrapped, cfg.strategy, info, sync=last):
                out = forward(batch["image"][c], batch["text"][text_rows(c)])
                if cached is None:
                    img_f, txt_f = out[0], out[1]
                    positives = mine(img_f, txt_f, step)
                else:
                    img_f = torch.cat([out[0] if i == j else cached[i][0] for i in range(len(chunks))])
                    txt_f = torch.cat([out[1] if i == j else cached[i][1] for i in range(len(chunks))])
                    if not last:  # the scale (and bias) get their gradient once, from the last micro-batch
                        out = (*out[:2], *(t.detach() for t in out[2:]))
                loss_c = contrastive_loss(img_f, txt_f, out, positives)
                loss = loss_c
                loss_d = torch.zeros((), device=device)
                if use_distill:
                    obj_logits, attr_logits = heads(out[0].float())
                    loss_d = distill(obj_logits, attr_logits, to_device(batch["obj"][c], device),
                                     to_device(batch["attr"][c], device))
                    loss_d = loss_d * (len(out[0]) / n)
                    loss = loss + loss_d
                scaler.scale(loss).backward()
            loss_c_total = loss_c.detach()
            loss_d_total = loss_d_total + loss_d.detach()
        sync_replicated_grads(replicated, info)
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            loss_c, loss_d = all_mean(loss_c_total, info), all_mean(torch.as_tensor(loss_d_total), info)
            rec = {"loss": (loss_c + loss_d).item(), "loss_contrastive": loss_c.item(), "loss_distill": loss_d.item(),
                   "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                   "positives_per_image": float(positives.sum(1).float().mean()) if positives is not None else 1.0,
                   "samples_per_s": (step + 1 - start) * cfg.batch_size / max(1e-9, time.time() - t0)}
            bar.update(step + 1 - bar.n)
            history.append({"step": step + 1, **rec})
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if log_fn and info.is_main:
                log_fn(step + 1, rec)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            model_sd, optim_sd = state_dicts(wrapped, opt, cfg.strategy, info)
            if info.is_main:
                _atomic_save({"model": model_sd, "heads": heads.state_dict() if heads is not None else None,
                              "optimizer": optim_sd, "step": step + 1, "digest": digest, "history": history,
                              "optimizer_heads": opt_heads.state_dict() if opt_heads is not None else None,
                              "scaler": scaler.state_dict(), "data_position": getattr(data, "position", None)},
                             ckpt_path)
            barrier(info)
    bar.close()
    model.eval()
    if info.is_main:
        ckpt_path.unlink(missing_ok=True)
    final = history[-1] if history else {}
    return {"final_loss": final.get("loss", float("nan")), "resumed_from_step": start, "history": history}
