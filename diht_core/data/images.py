"""Image tensors: uint8 at a model's size, CLIP normalisation, host-to-device copies."""

from __future__ import annotations

import numpy as np
import torch

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
