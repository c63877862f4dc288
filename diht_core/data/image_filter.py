"""Image classifiers of LAION's kind (NSFW, watermark): a CLIP image embedding and a small head, from local files,
run on a shard's downloaded images before the shard is written (so before CAT)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import PrecleanParams
from .shards import decode_image

BATCH = 64  # images per forward pass


def load_head(path: str | Path, in_dim: int, key: str) -> nn.Sequential:
    """A head file: the state_dict (torch.save) of an nn.Sequential of Linear layers with a ReLU between two, keys
    `<index>.weight` / `<index>.bias`, on the L2-normalised CLIP image embedding. One output: a logit (sigmoid);
    two: logits of (negative, positive) (softmax). LAION's Keras detectors convert by transposing each Dense kernel."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    index = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"(\d+)\.weight", k))})
    if not index or any(not re.fullmatch(r"\d+\.(weight|bias)", k) for k in state):
        raise ValueError(f"{key}: {path} is not a state_dict of Linear layers (keys <i>.weight, <i>.bias)")
    layers: list[nn.Module] = []
    dim = in_dim
    for n, i in enumerate(index):
        weight, bias = state[f"{i}.weight"], state.get(f"{i}.bias")
        if weight.ndim != 2 or weight.shape[1] != dim or bias is None or bias.shape != weight.shape[:1]:
            raise ValueError(f"{key}: layer {i} of {path} is not a Linear layer taking {dim} inputs (the CLIP "
                             f"embedding or the previous layer's outputs): weight {tuple(weight.shape)}")
        linear = nn.Linear(dim, weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layers += [linear] + ([nn.ReLU()] if n < len(index) - 1 else [])
        dim = weight.shape[0]
    if dim not in (1, 2):
        raise ValueError(f"{key}: {path} ends in {dim} outputs; a head ends in 1 (sigmoid) or 2 (softmax)")
    head = nn.Sequential(*layers)
    return head.eval()


def _probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)[:, 1]


class ImageFilter:
    """`ImageFilter.from_params(download.preclean)`; `apply(pairs)` fails the samples a head flags."""

    def __init__(self, model, preprocess, heads: dict[str, tuple[nn.Module, float]], digest: str, device: str):
        self.model, self.preprocess, self.heads, self.digest, self.device = model, preprocess, heads, digest, device

    @property
    def names(self) -> list[str]:
        return list(self.heads)

    @classmethod
    def from_params(cls, cfg: PrecleanParams, device: str | None = None) -> "ImageFilter":
        import open_clip

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for key in ("clip_weights", "nsfw_model", "watermark_model"):
            path = getattr(cfg, key)
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"download.preclean.{key}: no such file {path}")
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.clip_model, pretrained=cfg.clip_weights,
                                                                     device=device)
        model.eval()
        dim = model.visual.output_dim
        heads = {}
        for reason, key, limit in (("nsfw", "nsfw_model", cfg.max_nsfw),
                                   ("watermark", "watermark_model", cfg.max_watermark)):
            if getattr(cfg, key):
                heads[reason] = (load_head(getattr(cfg, key), dim, f"download.preclean.{key}").to(device), limit)
        files = {k: [getattr(cfg, k), Path(getattr(cfg, k)).stat().st_size] for k in
                 ("clip_weights", "nsfw_model", "watermark_model") if getattr(cfg, k)}
        digest = json.dumps({"clip_model": cfg.clip_model, "files": files, "max_nsfw": cfg.max_nsfw,
                             "max_watermark": cfg.max_watermark}, sort_keys=True)
        return cls(model, preprocess, heads, digest, device)

    @torch.no_grad()
    def embed(self, jpgs: list[bytes]) -> torch.Tensor:
        """The L2-normalised CLIP image embeddings of encoded images, (n, dim) float32 on the filter's device."""
        dim = self.model.visual.output_dim
        parts = [torch.zeros(0, dim, device=self.device)]
        for i in range(0, len(jpgs), BATCH):
            x = torch.stack([self.preprocess(decode_image(b)) for b in jpgs[i:i + BATCH]]).to(self.device)
            parts.append(nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(parts)

    @torch.no_grad()
    def probabilities(self, jpgs: list[bytes]) -> dict[str, np.ndarray]:
        """Each head's probability for each image."""
        emb = self.embed(jpgs)
        return {reason: _probability(head(emb)).cpu().numpy() for reason, (head, _) in self.heads.items()}

    def apply(self, pairs: list[tuple[dict | None, dict]]) -> list[tuple[dict | None, dict]]:
        """The (sample, row) pairs of a shard with the flagged samples failed (reason nsfw or watermark, the first
        head over its limit)."""
        ok = [i for i, (s, _) in enumerate(pairs) if s is not None]
        probs = self.probabilities([pairs[i][0]["jpg"] for i in ok])
        out = list(pairs)
        for n, i in enumerate(ok):
            for reason, (_, limit) in self.heads.items():
                p = float(probs[reason][n])
                if p > limit:
                    row = {**pairs[i][1], "status": "failed", "reason": reason,
                           "error_message": f"image classifier download.preclean.{reason}_model p = {p:.4f} > {limit}"}
                    out[i] = (None, row)
                    break
        return out
