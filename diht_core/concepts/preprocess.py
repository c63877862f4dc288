"""A teacher's own image preprocessing (resize the shorter side, centre crop, interpolation, mean and std), read from
the weights' config: torchvision's weights transforms, timm's data config, open_clip's preprocess config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..data.images import MEAN, STD


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> uint8 [3, crop, crop] (resize the shorter side to ``resize``, centre crop ``crop``; no squashing),
    then uint8 -> float normalised with ``mean`` and ``std``: what torchvision's ``ImageClassification`` and timm's
    eval transform do, split so that images are kept as uint8 until the model runs. ``source`` says where it came
    from."""

    source: str
    resize: int
    crop: int
    interpolation: str  # bicubic | bilinear | nearest (torchvision's InterpolationMode values)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.pil_to_tensor(TF.center_crop(img, [self.crop]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float, (x - 255·mean) / (255·std)."""
        mean, std = _scaled(self.mean, self.std, x.device)
        return (x.float() - mean) / std

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@lru_cache(maxsize=16)
def _scaled(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255·mean and 255·std as [1, 3, 1, 1] on device (one copy per device)."""
    return (torch.tensor(mean).view(1, 3, 1, 1).to(device) * 255.0,
            torch.tensor(std).view(1, 3, 1, 1).to(device) * 255.0)


def pretrained_here(image_size: int) -> Preprocess:
    """A teacher pre-trained here (teacher.weights null) is trained and read at teacher.image_size: shorter side
    resized to it, centre-cropped (bicubic), with CLIP's mean and std, the student's (a square image gives the
    same pixels as the square resize of the student's images)."""
    return Preprocess("pre-trained here (teacher.image_size)", image_size, image_size, "bicubic",
                      tuple(MEAN.flatten().tolist()), tuple(STD.flatten().tolist()))


def from_torchvision(weights) -> Preprocess:
    """The preprocessing of a torchvision weights enum member (``ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1``), as its
    ``transforms()`` applies it."""
    t = weights.transforms()
    resize, crop = list(t.resize_size), list(t.crop_size)
    if len(resize) != 1 or len(crop) != 1:
        raise ValueError(f"teacher.preprocess: {weights} resizes to {resize} and crops {crop}; only a shorter-side "
                         "resize and a square crop are supported")
    return Preprocess(f"torchvision:{type(weights).__name__}.{weights.name}", resize[0], crop[0],
                      t.interpolation.value, tuple(t.mean), tuple(t.std))


def from_timm(model) -> Preprocess:
    """timm's eval preprocessing of a timm model (``timm.data.resolve_data_config({}, model=model)``, as
    ``timm.data.create_transform`` builds it: resize the shorter side to floor(size / crop_pct), centre crop)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w or cfg.get("crop_mode", "center") != "center":
        raise ValueError(f"teacher.arch: timm's data config {cfg} is not a square centre crop; not supported")
    resize = math.floor(h / cfg["crop_pct"]) if cfg.get("crop_pct") else h
    return Preprocess(f"timm:{model.pretrained_cfg.get('architecture', '')}.{model.pretrained_cfg.get('tag', '')}",
                      resize, h, cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))


def from_open_clip(visual, name: str) -> Preprocess:
    """open_clip's eval preprocessing of an image tower (its preprocess_cfg; resize_mode shortest)."""
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    h, w = (size, size) if isinstance(size, int) else size
    if h != w or cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"teacher.arch: open_clip:{name}'s preprocess config {cfg} is not a square centre crop of "
                         "the shorter side; not supported")
    return Preprocess(f"open_clip:{name}", h, h, cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
