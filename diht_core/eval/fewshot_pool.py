"""Few-shot data streamed from shards: labels first, then only the images a probe needs, encoded batch by batch.

A split is never held in memory as images: one pass reads the labels and checks every sample (its json, its cls,
its image as data/shards.py check_image does: a JPEG decoded at 1/8 scale, nothing kept), so that a bad sample is
counted and never picked; a second decodes the samples to keep and encodes them in batches of ``batch_size``, so at
most one batch of images exists at a time. An ImageNet-sized train pool costs its labels and the features of the
k-shot samples, not its images. The pool is the split's good samples: pool index i is the i-th of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.images import image_to_uint8
from ..data.shards import (Faults, SampleFault, no_sample_left, open_image, pixel_limit, read_samples, shard_paths,
                           skip_or_fail)


def kshot_indices(labels, k: int, seed: int) -> torch.LongTensor:
    """k random indices per class (all of a class with fewer than k), sorted; deterministic from seed."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).sort().values


def needed_indices(labels, shots, seeds: int) -> torch.LongTensor:
    """Every index that kshot_indices picks for some k > 0 of shots and seed of range(seeds), sorted."""
    picks = [kshot_indices(labels, k, seed) for k in shots if k > 0 for seed in range(seeds)]
    return torch.unique(torch.cat(picks)) if picks else torch.zeros(0, dtype=torch.long)


def _samples(directory: Path, max_pixels: int | None = None, **kw) -> Iterator[dict]:
    """The parsed samples of a split's shards in order, truncation records included (read_samples)."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no shards in {directory}")
    for path in paths:
        yield from read_samples(path, max_pixels, **kw)


def split_labels(directory: str | Path, max_pixels: int | None = None,
                 faults: Faults | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(labels, positions) of the good samples of a split in shard order: their ``cls`` and their places in the
    split's sequence of samples (for stream_features). Every sample is checked, no image kept (max_pixels from the
    header; None: PIL's own limit); a bad one (data/shards.py FAULTS, or BAD_LABEL: no integer cls) or a cut shard is
    counted in ``faults`` and never in the pool (without ``faults``: an error naming shard, key and reason)."""
    labels, positions = [], []
    for i, s in enumerate(_samples(Path(directory), pixel_limit(max_pixels), need_label=True, check_only=True)):
        if not skip_or_fail(s, faults):
            labels.append(s["cls"])
            positions.append(i)
    no_sample_left(labels, directory, faults)
    return torch.tensor(labels), torch.tensor(positions)


def stream_features(directory: str | Path, keep: torch.LongTensor | None, encode: Callable[[torch.Tensor], torch.Tensor],
                    image_size: int, max_pixels: int | None, batch_size: int) -> torch.Tensor:
    """encode() of the images of the samples at the sorted positions ``keep`` (split_labels' positions; None: every
    sample), in batches of batch_size uint8 [B, 3, S, S] images in shard order; returns the features [len(keep), d]
    in that order.

    Only kept samples are decoded (max_pixels from the header; None: PIL's own limit); a bad one (with keep None: any
    fault, a cut shard) is an error naming shard, key and reason.
    """
    limit = pixel_limit(max_pixels)
    wanted = None if keep is None else set(keep.tolist())
    out, buf = [], []
    for i, s in enumerate(_samples(Path(directory))):
        if wanted is None:
            skip_or_fail(s, None)  # every sample wanted: any fault is an error
        elif i not in wanted:
            continue
        try:
            buf.append(image_to_uint8(open_image(s.get("image_bytes"), limit), image_size))
        except SampleFault as fault:
            raise ValueError(f"{s['shard']} sample {s['key']!r}: {fault.reason} ({fault.message})") from None
        if len(buf) == batch_size:
            out.append(encode(torch.stack(buf)))
            buf = []
    if buf:
        out.append(encode(torch.stack(buf)))
    n = len(wanted) if wanted is not None else sum(len(o) for o in out)
    if sum(len(o) for o in out) != n:
        raise ValueError(f"{directory}: {n} samples wanted, {sum(len(o) for o in out)} found")
    return torch.cat(out) if out else torch.zeros(0, 0)


class PoolFeatures:
    """Features of some samples of a pool, indexed by the samples' pool indices (``features[idx]`` as a tensor of
    the whole pool would be); any other index is an error."""

    def __init__(self, indices: torch.LongTensor, features: torch.Tensor):
        self.indices, self.features = indices, features

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pos = torch.searchsorted(self.indices, idx).clamp_max(max(len(self.indices) - 1, 0))
        if len(self.indices) == 0 or not torch.equal(self.indices[pos], idx):
            raise IndexError("a pool index whose features were not kept")
        return self.features[pos]
