"""Unit-norm embeddings from a CLIP model: uint8 image tensors, PIL images, texts and VQA statements."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.images import normalize_images


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of uint8 [N, 3, H, W] images already at the model's size (normalised here)."""
    out = [model.encode_image(normalize_images(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def encode_pil(model, preprocess, images, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of PIL images through the model's own eval preprocessing (resize, crop, normalise)."""
    out, buf = [], []
    with torch.no_grad():
        for img in images:
            buf.append(preprocess(img.convert("RGB")))
            if len(buf) == batch_size:
                out.append(model.encode_image(torch.stack(buf)))
                buf = []
        if buf:
            out.append(model.encode_image(torch.stack(buf)))
    return F.normalize(torch.cat(out).float(), dim=-1)


def text_encoder(model, tokenizer, batch_size: int = 256):
    """A function: list of texts -> unit-norm text embeddings [T, d]."""
    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        out = [model.encode_text(tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)
    return encode


def encode_statements(encode, statements: list[list[str]]) -> torch.Tensor:
    """[questions, max answers, d] statement embeddings; questions with fewer answers are padded with NaN rows."""
    flat = encode([s for row in statements for s in row])
    out = torch.full((len(statements), max(map(len, statements)), flat.shape[1]), float("nan"))
    offset = 0
    for i, row in enumerate(statements):
        out[i, :len(row)] = flat[offset:offset + len(row)]
        offset += len(row)
    return out
