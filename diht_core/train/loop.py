"""The training loop: InfoNCE, HN-NCE or FFF's sigmoid loss, plus concept distillation, on one process or on
torchrun ranks (DDP/FSDP)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..config import TrainParams
from ..data.images import normalize_images, to_device
from ..models import ConceptHeads
from . import optim
from .checkpoint import clear_checkpoints, load_checkpoint, restore, run_digest, save_checkpoint
from .distributed import (DistInfo, all_mean, barrier, gather_no_grad, no_sync, replicated_params,
                          sync_replicated_grads, wrap_model)
from .losses import ConceptDistillationLoss, create_loss, mine_false_negatives
from .mechanisms import measure

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward(model, images, text, device, amp_dtype):
    """(image features, text features, logit scale[, bias]) of uint8 images and tokens, under autocast."""
    images = normalize_images(to_device(images, device))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(images, to_device(text, device))


def text_rows(c, k: int):
    """The rows of the K captions of the images in c (image-major)."""
    return (c[:, None] * k + torch.arange(k)).reshape(-1) if k > 1 and torch.is_tensor(c) else c


def mining(cfg: TrainParams, step: int) -> bool:
    """Whether FFF's thresholds mine positives at this step (the sigmoid loss, a threshold set, from the start)."""
    thresholds = (cfg.fff_it_threshold, cfg.fff_tt_threshold, cfg.fff_ii_threshold)
    return cfg.loss == "sigmoid" and any(t is not None for t in thresholds) and step >= cfg.fff_mining_start


def positives(cfg: TrainParams, img_f, txt_f, step: int, info: DistInfo):
    """FFF: positives mined on the gathered batch, this rank's rows; None: each image's own captions only."""
    thresholds = (cfg.fff_it_threshold, cfg.fff_tt_threshold, cfg.fff_ii_threshold)
    on = mining(cfg, step)
    if cfg.loss != "sigmoid" or not (on or cfg.captions_per_image > 1):
        return None
    m = mine_false_negatives(gather_no_grad(img_f, info), gather_no_grad(txt_f, info),
                             *(thresholds if on else (None,) * 3), captions_per_image=cfg.captions_per_image)
    return m[info.rank * len(img_f):(info.rank + 1) * len(img_f)]


def train(model, data, cfg: TrainParams, checkpoint_dir: str | Path,
          log_fn: Callable[[int, dict], None] | None = None, heads: ConceptHeads | None = None,
          dist: DistInfo | None = None, keep_checkpoints: bool = False) -> dict:
    """Train in place on a TrainSet (in memory) or StreamingData; resume from this run's checkpoints in
    checkpoint_dir/<run digest>/ (same params and data). Under torchrun pass ``init_distributed()``: each rank trains
    on its share of every global batch (DDP or FSDP by ``cfg.strategy``). Returns summary metrics (rank 0 logs and
    saves) and the run's checkpoint folder, which is removed at the end unless keep_checkpoints (the caller removes
    it once its outputs are saved). The data order and the learning rate are functions of the global step, so a
    resumed run continues exactly where it stopped. A step whose loss is not finite is skipped; more than
    ``cfg.max_nonfinite_steps`` of them in a row raise FloatingPointError. When the batches carry planted scene ids,
    each log record also holds the mechanism measurements of its step (train/mechanisms.py)."""
    info = dist or DistInfo(device=next(model.parameters()).device)
    device, k = info.device, cfg.captions_per_image
    if cfg.seed is None:
        raise ValueError("train.seed is null: pass the train params with the seed resolved (Params.resolved_train)")
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the world size {info.world_size}")
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
    opt = optim.adamw(model.parameters(), cfg)
    opt_heads = optim.adamw(heads.parameters(), cfg) if heads is not None else None  # apart: FSDP's state dicts
    optimizers = [o for o in (opt, opt_heads) if o is not None]                      # know the model's params only
    replicated = replicated_params(model, cfg.strategy, heads.parameters() if heads is not None else ())
    contrastive = create_loss(cfg, rank=info.rank, world_size=info.world_size)
    distill = ConceptDistillationLoss(cfg.lambda_obj, cfg.lambda_attr)
    has_targets = getattr(data, "has_targets", getattr(data, "obj_targets", None) is not None)
    use_distill = heads is not None and has_targets and (cfg.lambda_obj > 0 or cfg.lambda_attr > 0)
    amp_dtype = AMP[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")

    digest = run_digest(cfg, data)
    ckpt_dir = Path(checkpoint_dir) / digest
    start, history, position, skipped = 0, [], None, 0
    ck = load_checkpoint(ckpt_dir, digest, info)
    if ck is not None:
        start, history, position = restore(ck, model, opt, heads, opt_heads, scaler, cfg.strategy, info)
        del ck
    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", mininterval=2.0, disable=not info.is_main)
    for step, batch in enumerate(data.batches(cfg, start, info.rank, info.world_size, position), start=start):
        lr = optim.cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
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
                cached = [forward(forward_model, batch["image"][c], batch["text"][text_rows(c, k)], device,
                                  amp_dtype)[:2] for c in chunks]
            pos = positives(cfg, torch.cat([f[0] for f in cached]), torch.cat([f[1] for f in cached]), step, info)
        loss_c_total, loss_d_total = 0.0, 0.0
        for j, c in enumerate(chunks):
            last = j == len(chunks) - 1
            with no_sync(wrapped, cfg.strategy, info, sync=last):
                out = forward(forward_model, batch["image"][c], batch["text"][text_rows(c, k)], device, amp_dtype)
                if cached is None:
                    img_f, txt_f = out[0], out[1]
                    pos = positives(cfg, img_f, txt_f, step, info)
                else:
                    img_f = torch.cat([out[0] if i == j else cached[i][0] for i in range(len(chunks))])
                    txt_f = torch.cat([out[1] if i == j else cached[i][1] for i in range(len(chunks))])
                    if not last:  # the scale (and bias) get their gradient once, from the last micro-batch
                        out = (*out[:2], *(t.detach() for t in out[2:]))
                if cfg.loss == "sigmoid":
                    loss_c = contrastive(img_f, txt_f, out[2], out[3], positives=pos)
                else:
                    loss_c = contrastive(img_f, txt_f, out[2])
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
        # the fp16 scaler skips a step with non-finite gradients itself (and adjusts its scale): no check, no sync
        step_loss = None if scaler.is_enabled() else all_mean(loss_c_total + loss_d_total, info)  # same on all ranks
        finite = step_loss is None or bool(torch.isfinite(step_loss))
        if finite:
            sync_replicated_grads(replicated, info)
            for o in optimizers:
                scaler.step(o)
            scaler.update()
        skipped = 0 if finite else skipped + 1
        if skipped > cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"train: the loss is {step_loss.item()} at step {step + 1} ({skipped} step(s) in a row with a "
                f"non-finite loss, train.max_nonfinite_steps={cfg.max_nonfinite_steps}); nothing of it is saved. "
                "Lower train.lr, or look at the data")
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            loss_c, loss_d = all_mean(loss_c_total, info), all_mean(torch.as_tensor(loss_d_total), info)
            rec = {"loss": (loss_c + loss_d).item(), "loss_contrastive": loss_c.item(), "loss_distill": loss_d.item(),
                   "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                   "positives_per_image": float(pos.sum(1).float().mean()) if pos is not None else 1.0,
                   **({"grad_scale": scaler.get_scale()} if scaler.is_enabled() else {}),  # fp16: falls on a skip
                   "samples_per_s": (step + 1 - start) * cfg.batch_size / max(1e-9, time.time() - t0),
                   **measure(cfg, batch.get("scene_id"), img_f, txt_f, out[2], pos if mining(cfg, step) else None,
                             info, batch.get("family_id"))}  # against the planted truth, when the data carry it
            bar.update(step + 1 - bar.n)
            history.append({"step": step + 1, **rec})
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if log_fn and info.is_main:
                log_fn(step + 1, rec)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, digest, history, wrapped, opt, heads, opt_heads, scaler, data,
                            cfg.strategy, info)
            barrier(info)
    bar.close()
    model.eval()
    if info.is_main and not keep_checkpoints:
        clear_checkpoints(ckpt_dir)
    final = history[-1] if history else {}
    return {"final_loss": final.get("loss", float("nan")), "resumed_from_step": start, "history": history,
            "checkpoint_dir": ckpt_dir}
