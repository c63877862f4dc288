"""The optimiser and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from ..config import TrainParams


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay, a function of the global step only."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw(params, cfg: TrainParams) -> torch.optim.AdamW:
    """AdamW, decoupled weight decay on matrices only. Scalars get a group of their own: under FSDP they are
    plain tensors among DTensors, and a foreach step cannot mix the two."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim == 0], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fusable(params))


def fusable(params) -> bool:
    """Whether AdamW's fused kernel (one pass per tensor: about 9x faster than the per-tensor default on the CPU,
    where torch does not pick it itself) takes these params: floating tensors on the CPU or a GPU, no DTensors
    (FSDP's shards keep the default step)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
               for p in params)
