"""Checkpoints of a training run: one folder per run (its digest: train params and data), the last two kept
(latest.pt, previous.pt), each written atomically; rank 0 reads and decides for every rank."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..config import TrainParams
from ..data.files import atomic_torch_save
from .distributed import DistInfo, broadcast_object, load_state_dicts, state_dicts

# params that decide nothing about the run's numbers (the world size and workers are in the data fingerprint)
_NOT_IN_DIGEST = {"device", "launcher", "nproc_per_node", "workers", "max_nonfinite_steps"}
LATEST, PREVIOUS = "latest.pt", "previous.pt"


def run_digest(cfg: TrainParams, data) -> str:
    """The identity of a run: its train params and its data's fingerprint."""
    params = cfg.model_dump_json(exclude=_NOT_IN_DIGEST)
    return f"{hashlib.sha256(params.encode()).hexdigest()[:16]}-{data.digest()}"


def nan_tensors(state: dict) -> list[str]:
    """The names of the tensors of a state dict that hold a NaN (infinities are legitimate: attention masks)."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and bool(v.isnan().any())]


def refuse_nan(state: dict, what: str) -> None:
    """Raise FloatingPointError rather than save weights holding NaNs."""
    bad = nan_tensors(state)
    if bad:
        raise FloatingPointError(f"{what}: NaN in {len(bad)} tensor(s) ({', '.join(bad[:3])}); not saved")


def _read(directory: Path, digest: str) -> dict | None:
    """The newest readable checkpoint of this run in directory: latest.pt, else previous.pt (with a warning when
    latest.pt is corrupt; a corrupt file is removed, so the next save does not keep it as previous.pt)."""
    corrupt = []
    for name in (LATEST, PREVIOUS):
        path = directory / name
        if not path.exists():
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or "step" not in ck or "model" not in ck:
                raise ValueError("not a training checkpoint")
        except Exception as err:  # a torn or damaged file: torch raises several types
            why = (str(err).strip().splitlines() or [""])[0][:160]
            warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {why}); removed", stacklevel=3)
            path.unlink(missing_ok=True)
            corrupt.append(name)
            continue
        if ck.get("digest") != digest:  # not this run's: the same config and data only
            return None
        if corrupt:
            warnings.warn(f"resuming from {path} (step {ck['step']}) instead", stacklevel=3)
        return ck
    if corrupt:
        warnings.warn(f"no readable checkpoint in {directory}: training starts afresh", stacklevel=3)
    return None


def load_checkpoint(directory: Path, digest: str, info: DistInfo) -> dict | None:
    """The newest checkpoint of this very run, or None; rank 0 reads it and broadcasts it to every rank."""
    return broadcast_object(_read(Path(directory), digest) if info.is_main else None, info)


def restore(ck: dict, model, opt, heads, opt_heads, scaler, strategy: str, info: DistInfo) -> tuple:
    """Load a checkpoint into the model, heads, optimisers and scaler; (step, history, data position)."""
    load_state_dicts(model, opt, ck["model"], ck["optimizer"], strategy, info)
    if heads is not None and ck.get("heads") is not None:
        heads.load_state_dict(ck["heads"])
        opt_heads.load_state_dict(ck["optimizer_heads"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    return ck["step"], ck.get("history", []), ck.get("data_position")


def save_checkpoint(directory: Path, step: int, digest: str, history: list, wrapped, opt, heads, opt_heads, scaler,
                    data, strategy: str, info: DistInfo) -> None:
    """Every rank takes part (FSDP gathers the full state); rank 0 moves latest.pt to previous.pt and writes the
    new latest.pt (weights holding NaNs are refused)."""
    model_sd, optim_sd = state_dicts(wrapped, opt, strategy, info)
    if info.is_main:
        refuse_nan(model_sd, f"checkpoint at step {step}")
        latest = Path(directory) / LATEST
        if latest.exists():
            os.replace(latest, latest.with_name(PREVIOUS))
        atomic_torch_save({"model": model_sd, "heads": heads.state_dict() if heads is not None else None,
                           "optimizer": optim_sd, "step": step, "digest": digest, "history": history,
                           "optimizer_heads": opt_heads.state_dict() if opt_heads is not None else None,
                           "scaler": scaler.state_dict(), "data_position": getattr(data, "position", None)}, latest)


def clear_checkpoints(directory: Path) -> None:
    """A finished run's checkpoints (only its own folder)."""
    directory = Path(directory)
    for name in (LATEST, PREVIOUS):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not there, or holding something else
        pass
