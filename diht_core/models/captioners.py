"""Image-to-text models that write pseudo-captions (FFF): a small registry of captioner kinds.

A captioner is built from the `recaption` params (``make_captioner``) and maps a batch of RGB images to K captions
of each (``caption(images, seed)``). ``identity`` names what decides the captions without loading the model (its
files, device, dtype, the code and library versions), so other weights redo the shards captioned with the old ones.
Add a kind by writing a class with that interface and listing it in CAPTIONERS (and in RecaptionParams.kind).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..config import RecaptionParams

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Captioner(Protocol):
    def caption(self, images: list[Image.Image], seed: int) -> list[list[str]]:
        """K = num_captions captions of each image, in order; the same seed gives the same captions."""


def model_fingerprint(path: Path) -> str:
    """The files of a model folder by name and size (hashing gigabytes of weights on every run would cost more than
    it catches)."""
    files = sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("recaption.device: cuda, but torch sees no CUDA device")
    return torch.device(name)


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def model_folder(cfg: RecaptionParams) -> Path:
    path = Path(cfg.model_path or "")
    if not cfg.model_path or not (path / "config.json").is_file():
        raise FileNotFoundError(f"recaption.model_path: {cfg.model_path!r} is not a folder with a config.json "
                                "(save the model and its processor there with save_pretrained)")
    return path


class Blip2Captioner:
    """BLIP-2 (transformers' Blip2ForConditionalGeneration and its processor) from a local folder. Sampling: K
    sequences per image with nucleus sampling (FFF's diverse captions); without sampling, beam search keeping the K
    best beams."""

    def __init__(self, cfg: RecaptionParams):
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        path = model_folder(cfg)
        self.cfg, self.device = cfg, _device(cfg.device)
        # a local folder only (model_folder checked it): never the Hub, even where HF_HUB_OFFLINE is unset
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True,
                                                                   dtype=_dtype(cfg.precision, self.device))
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], seed: int) -> list[list[str]]:
        c, k = self.cfg, self.cfg.num_captions
        inputs = self.processor(images=images, text=[""] * len(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        torch.manual_seed(seed)  # seeds CPU and CUDA generators alike
        sampling = {"do_sample": True, "top_p": c.top_p, "temperature": c.temperature} if c.do_sample else \
            {"do_sample": False, "num_beams": k}
        out = self.model.generate(**inputs, **sampling, num_return_sequences=k, max_new_tokens=c.max_new_tokens,
                                  min_new_tokens=c.min_new_tokens)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * k:(i + 1) * k] for i in range(len(images))]  # generate returns them image-major


CAPTIONERS = {"blip2": Blip2Captioner}


def make_captioner(cfg: RecaptionParams) -> Captioner:
    return CAPTIONERS[cfg.kind](cfg)


def identity(cfg: RecaptionParams) -> str:
    """What decides a captioner's output besides its params: the model's files, the device and dtype it runs in,
    this code and the versions of torch and transformers."""
    from importlib.metadata import version

    device = _device(cfg.device)
    parts = [cfg.kind, model_fingerprint(model_folder(cfg)), str(device.type), str(_dtype(cfg.precision, device)),
             hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16], version("torch"), version("transformers")]
    return "/".join(parts)
