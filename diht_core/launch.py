"""torchrun ranks for any stage: launching them from the stage's own process (the same params file and overrides on
every rank), joining their process group (NCCL on GPU, gloo on CPU), each rank's device, and its share of a list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Params


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def pick_device(device: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``device`` (auto | cpu | cuda, the param ``key``) for the rank with this local rank: auto is its GPU when
    torch sees one, else the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}: cuda, but torch sees no CUDA device")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str, section: str = "train") -> DistInfo:
    """Join torchrun's process group when launched by it (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set); otherwise a
    single process. NCCL on GPU, gloo on CPU. ``section``: the params section whose ``device`` and
    ``nproc_per_node`` errors name."""
    if not launched_by_torchrun():
        return DistInfo(device=pick_device(device, 0, f"{section}.device"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = pick_device(device, local, f"{section}.device")
    if dev.type == "cuda" and local >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local} but only {torch.cuda.device_count()} CUDA devices: "
                           f"lower {section}.nproc_per_node (or --nproc-per-node)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def destroy(info: DistInfo) -> None:
    if launched_by_torchrun() and dist.is_initialized():
        dist.destroy_process_group()


def rank_share(items: list, info: DistInfo) -> list:
    """The items this rank owns: item i goes to rank i % world_size (a pure function of the list and the world)."""
    return items[info.rank::info.world_size]


def sum_counts(counts: dict[str, int], info: DistInfo) -> dict[str, int]:
    """Integer counts summed over ranks (every rank gets the sums)."""
    if info.world_size == 1:
        return counts
    keys = sorted(counts)
    x = torch.tensor([counts[k] for k in keys], dtype=torch.int64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(x)
    return dict(zip(keys, x.tolist()))


def local_world_size(nproc_per_node: int | str, device: str) -> int:
    """Ranks per machine: nproc_per_node, or for "auto" one per GPU (device auto or cuda, GPUs seen) else one per
    CPU core."""
    if nproc_per_node != "auto":
        return int(nproc_per_node)
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch_torchrun(p: Params, module: str, nproc_per_node: int, workdir: Path, env: dict,
                    stage: str | None = None, nnodes: int = 1, rdzv_endpoint: str | None = None) -> dict:
    """`torchrun --standalone --nproc-per-node N -m <module> --params <the same file> --overrides <the same>`:
    every rank validates the same params; this machine's first rank hands its metrics back through a file
    (``--result``). With ``nnodes`` > 1, a c10d rendezvous at ``rdzv_endpoint`` instead of ``--standalone``: the
    ranks start when the other machines' torchrun (started by hand, same module and params) have joined."""
    stage = stage or module.rpartition(".")[2]
    if p.source is None:
        raise ValueError(f"{stage}: launcher torchrun needs params loaded from a file (load_params)")
    path, overrides = p.source
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / f"result-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"  # this launch's own
    project = str(Path(__file__).resolve().parents[1])  # where tasks/ and diht_core/ are
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    nodes = (["--standalone"] if nnodes == 1 else  # this machine hosts the rendezvous (is_host) whatever its name
             [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-conf=is_host=1"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc-per-node={nproc_per_node}",
           "-m", module, "--params", str(path), "--overrides", json.dumps(overrides), "--result", str(result)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{stage}: torchrun failed (exit code {proc.returncode}; the ranks' errors are above); "
                           f"command: {' '.join(cmd)}")
    metrics = json.loads(result.read_text())
    result.unlink()
    return metrics
