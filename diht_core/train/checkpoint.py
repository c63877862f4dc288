"""Checkpoints of a training run: written atomically, resumed only by the run they belong to (same train
params, same data); rank 0 reads and decides for every rank."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..config import TrainParams
from .distributed import DistInfo, broadcast_object, load_state_dicts, state_dicts

# params that decide nothing about the run's numbers (the world size and workers are in the data fingerprint)
_NOT_IN_DIGEST = {"device", "launcher", "nproc_per_node", "workers"}


def run_digest(cfg: TrainParams, data) -> str:
    """The identity of a run: its train params and its data's fingerprint."""
    params = cfg.model_dump_json(exclude=_NOT_IN_DIGEST)
    return f"{hashlib.sha256(params.encode()).hexdigest()[:16]}-{data.digest()}"


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, digest: str, info: DistInfo) -> dict | None:
    """The checkpoint of this very run, or None; rank 0 reads it and broadcasts it to every rank."""
    ck = None
    if info.is_main and path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck = ck if ck.get("digest") == digest else None  # same config and same data: continue that run
    return broadcast_object(ck, info)


def restore(ck: dict, model, opt, heads, opt_heads, scaler, strategy: str, info: DistInfo) -> tuple:
    """Load a checkpoint into the model, heads, optimisers and scaler; (step, history, data position)."""
    load_state_dicts(model, opt, ck["model"], ck["optimizer"], strategy, info)
    if heads is not None and ck.get("heads") is not None:
        heads.load_state_dict(ck["heads"])
        opt_heads.load_state_dict(ck["optimizer_heads"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    return ck["step"], ck.get("history", []), ck.get("data_position")


def save_checkpoint(path: Path, step: int, digest: str, history: list, wrapped, opt, heads, opt_heads, scaler,
                    data, strategy: str, info: DistInfo) -> None:
    """Every rank takes part (FSDP gathers the full state); rank 0 writes."""
    model_sd, optim_sd = state_dicts(wrapped, opt, strategy, info)
    if info.is_main:
        atomic_save({"model": model_sd, "heads": heads.state_dict() if heads is not None else None,
                     "optimizer": optim_sd, "step": step, "digest": digest, "history": history,
                     "optimizer_heads": opt_heads.state_dict() if opt_heads is not None else None,
                     "scaler": scaler.state_dict(), "data_position": getattr(data, "position", None)}, path)
