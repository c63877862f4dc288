"""Image tensors: shards read as uint8 at a model's size, CLIP normalisation, host-to-device copies."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .shards import Faults, no_sample_left, pixel_limit, read_samples, shard_paths, skip_or_fail

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
_NORM: dict = {}


def image_to_uint8(img, size: int) -> torch.Tensor:
    """A PIL image as uint8 [3, size, size] (bicubic)."""
    img = img.resize((size, size), resample=3)  # bicubic
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Host to GPU through pinned memory, asynchronously (a pageable copy would wait for the GPU to drain)."""
    if torch.device(device).type != "cuda" or x.is_cuda:
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float, normalised with CLIP's mean and std."""
    if x.device not in _NORM:  # one host-to-device copy per device, not one per step
        _NORM[x.device] = (MEAN.to(x.device) * 255.0, STD.to(x.device) * 255.0)
    mean, std = _NORM[x.device]
    return (x.float() - mean) / std


def read_decoded(paths: Iterable[str | Path], image_size: int | Callable[[Image.Image], torch.Tensor],
                 max_pixels: int, need_caption: bool = False, need_label: bool = False) -> Iterator[dict]:
    """The samples of these shards (as ``read_samples``); those without a fault with ``image``: uint8
    [3, S, S] at ``image_size`` (squashed to the square), or what ``image_size`` makes of the PIL image when it is a
    function (a teacher's own resize and crop). The caller skips and counts the faults (``Faults``), or fails."""
    to_uint8 = image_size if callable(image_size) else partial(image_to_uint8, size=image_size)
    for path in paths:
        for s in read_samples(path, max_pixels, need_caption, need_label):
            if s["fault"] is None:
                s["image"] = to_uint8(s.pop("pil"))
            yield s


def load_split(directory: str | Path, image_size: int | Callable[[Image.Image], torch.Tensor],
               max_pixels: int | None = None, faults: Faults | None = None, need_label: bool = False) -> dict:
    """A whole split of generated data in memory: images (uint8 at image_size, as ``read_decoded``), cls (-1 where
    none; need_label: a missing or non-integer cls is the fault BAD_LABEL), txt and json of every sample. A bad
    sample or a truncated shard is skipped and counted in ``faults`` (an error when no sample is left); without
    ``faults`` any fault is an error naming the shard, the key and the reason. max_pixels: None, PIL's own bomb
    limit only."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no shards in {directory}")
    images, cls, txt, meta = [], [], [], []
    for s in read_decoded(paths, image_size, pixel_limit(max_pixels), need_label=need_label):
        if skip_or_fail(s, faults):
            continue
        images.append(s["image"])
        cls.append(s.get("cls", -1))
        txt.append(s.get("txt", ""))
        meta.append(s.get("json", {}))
    no_sample_left(images, directory, faults)
    return {"images": torch.stack(images), "cls": torch.tensor(cls), "txt": txt, "json": meta}
