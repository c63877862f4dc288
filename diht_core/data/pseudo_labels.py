"""The pseudo-label file format: per shard an .npz of top-k teacher concepts (index int32, probability fp16,
renormalised) for each sample key, and the digest of its inputs; read sparse (``SparsePseudoLabels``) or dense (``load_all``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_savez


def sparsify(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the top k of each row (in descending order) and renormalise them to sum to 1."""
    k = min(k, probs.shape[1])
    vals, idx = probs.float().topk(k, dim=1)
    vals = vals / vals.sum(1, keepdim=True).clamp_min(1e-12)
    return idx.to(torch.int32).numpy(), vals.to(torch.float16).numpy()


def densify(idx: np.ndarray, vals: np.ndarray, size: int) -> torch.Tensor:
    out = torch.zeros(idx.shape[0], size)
    out.scatter_(1, torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(vals.astype(np.float32)))
    return out


def save_shard(path: str | Path, keys: list[str], obj: tuple, attr: tuple, digest: str | None = None) -> None:
    """One shard's file, atomically; ``digest``: of the inputs it was made from, which a resumed run checks."""
    extra = {"digest": np.array(digest)} if digest is not None else {}
    atomic_savez(path, keys=np.array(keys), obj_idx=obj[0], obj_p=obj[1], attr_idx=attr[0], attr_p=attr[1], **extra)


class SparsePseudoLabels:
    """All pseudo-label shards of a directory, kept sparse (int32 index, fp16 prob), looked up by key."""

    def __init__(self, directory: str | Path, n_objects: int, n_attributes: int):
        files = sorted(Path(directory).glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"no pseudo-label shards in {directory}")
        parts = [np.load(f) for f in files]
        self.keys = [k for z in parts for k in z["keys"].tolist()]
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.obj_idx = np.concatenate([z["obj_idx"] for z in parts])
        self.obj_p = np.concatenate([z["obj_p"] for z in parts])
        self.attr_idx = np.concatenate([z["attr_idx"] for z in parts])
        self.attr_p = np.concatenate([z["attr_p"] for z in parts])
        self.sizes = (n_objects, n_attributes)

    def __contains__(self, key: str) -> bool:
        return key in self.row

    def dense(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.row[key]
        return (densify(self.obj_idx[i:i + 1], self.obj_p[i:i + 1], self.sizes[0])[0],
                densify(self.attr_idx[i:i + 1], self.attr_p[i:i + 1], self.sizes[1])[0])


def load_all(directory: str | Path, n_objects: int, n_attributes: int) -> dict:
    """All shards of a directory, dense: {"index": key -> row, "objects": [N,Vo], "attributes": [N,Va]}."""
    sp = SparsePseudoLabels(directory, n_objects, n_attributes)
    return {"index": sp.row, "objects": densify(sp.obj_idx, sp.obj_p, n_objects),
            "attributes": densify(sp.attr_idx, sp.attr_p, n_attributes)}
