"""Webdataset shard I/O shared by the stages."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image


def shard_paths(directory: str | Path) -> list[Path]:
    """The .tar shards of a directory, sorted."""
    return sorted(Path(directory).glob("*.tar"))


def encode_jpg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; raises ValueError on a corrupt image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises several types for corrupt data
        raise ValueError(f"corrupt image: {err}") from err
    return img.convert("RGB")


def write_shard(path: str | Path, samples: list[dict]) -> None:
    """Write samples ({"__key__", ext: bytes|str|dict}) atomically to one tar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed mtime: same samples, same bytes
        for s in samples:
            sink.write(s)
    os.replace(tmp, path)


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Raw samples of one shard: dict of key -> bytes, plus __key__."""
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    for sample in ds:
        yield sample


def read_samples(path: str | Path) -> Iterator[dict]:
    """Decoded samples: {"key", "image": PIL, "txt": str, "json": dict} (fields that exist)."""
    for raw in iter_shard(path):
        out = {"key": raw["__key__"]}
        for ext in ("jpg", "png", "webp"):
            if ext in raw:
                out["image_bytes"] = raw[ext]
                break
        if "txt" in raw:
            out["txt"] = raw["txt"].decode("utf-8", errors="replace")
        if "json" in raw:
            out["json"] = json.loads(raw["json"])
        if "cls" in raw:
            out["cls"] = int(raw["cls"])
        yield out
