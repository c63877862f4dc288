"""torchrun plumbing of training: DDP or FSDP wrapping, gradient and state-dict collectives (the process group and
the launch are diht_core/launch.py's, re-exported here)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..launch import DistInfo, barrier, destroy, init_distributed, launched_by_torchrun, pick_device  # noqa: F401


def scalar_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo) -> torch.nn.Module:
    """DDP or FSDP2 around an open_clip model (in place for FSDP); identity on one process.

    FSDP is FSDP2's ``fully_shard``, one unit per residual block plus the root; the scalar parameters
    (``logit_scale``/``logit_bias``), which FSDP cannot shard, stay replicated and their gradients are averaged by
    ``sync_replicated_grads`` (as are the concept heads', which live outside the model).
    """
    if info.world_size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for tower in (getattr(model, "visual", None), model):
            blocks = getattr(getattr(tower, "transformer", None), "resblocks", [])
            for block in blocks:
                fully_shard(block)
        fully_shard(model, ignored_params=set(scalar_params(model)))
        return model
    raise ValueError(f"unknown strategy {strategy!r}; use ddp or fsdp")


def replicated_params(model: torch.nn.Module, strategy: str, extra=()) -> list[torch.nn.Parameter]:
    """Parameters whose gradients the wrapper does not average: FSDP's ignored scalars plus ``extra``."""
    return (scalar_params(model) if strategy == "fsdp" else []) + list(extra)


def sync_replicated_grads(params, info: DistInfo) -> None:
    """Average gradients over ranks (what DDP does for the parameters it wraps)."""
    if info.world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def no_sync(wrapped: torch.nn.Module, strategy: str, info: DistInfo, sync: bool):
    """Context for a micro-batch whose gradients are only accumulated (no communication)."""
    import contextlib

    if info.world_size == 1 or sync:
        if strategy == "fsdp" and info.world_size > 1:
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if strategy == "ddp":
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def all_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / info.world_size


def gather_no_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out)


def state_dicts(model, optimizer, strategy: str, info: DistInfo) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts; with FSDP a collective, filled on rank 0."""
    if strategy == "fsdp" and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    module = getattr(model, "module", model)
    return module.state_dict(), optimizer.state_dict()


def load_state_dicts(model, optimizer, model_sd: dict, optim_sd: dict, strategy: str, info: DistInfo) -> None:
    """Inverse of ``state_dicts``: every rank passes the full dicts read from the checkpoint."""
    if strategy == "fsdp" and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    getattr(model, "module", model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's object on every rank (pickled; e.g. the checkpoint it read)."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_model_state(model, strategy: str, info: DistInfo) -> dict:
    """The whole model's state dict on CPU (with FSDP a collective; filled on rank 0)."""
    if strategy == "fsdp" and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in getattr(model, "module", model).state_dict().items()}
