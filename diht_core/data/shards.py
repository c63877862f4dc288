"""Webdataset shards: the one reader and writer every stage uses, and image decoding."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
import webdataset as wds
from PIL import Image

from .files import atomic_path
from .images import image_to_uint8


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
    with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed mtime: same bytes
        for s in samples:
            sink.write(s)


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


def read_decoded(paths: Iterable[str | Path], image_size: int) -> Iterator[dict]:
    """The samples of these shards (as ``read_samples``) with ``image``: uint8 [3, S, S] at ``image_size``, or
    None where the image is missing or corrupt (the caller skips and counts it, or fails)."""
    for path in paths:
        for s in read_samples(path):
            try:
                s["image"] = image_to_uint8(decode_image(s["image_bytes"]), image_size)
            except (ValueError, KeyError):
                s["image"] = None
            yield s


def load_split(directory: str | Path, image_size: int) -> dict:
    """A whole split in memory: images (uint8 at image_size), cls, txt and json of every sample."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no shards in {directory}")
    images, cls, txt, meta = [], [], [], []
    for s in read_decoded(paths, image_size):
        if s["image"] is None:
            raise ValueError(f"sample {s['key']!r} of {directory}: no readable image")
        images.append(s["image"])
        cls.append(s.get("cls", -1))
        txt.append(s.get("txt", ""))
        meta.append(s.get("json", {}))
    return {"images": torch.stack(images), "cls": torch.tensor(cls), "txt": txt, "json": meta}


def count_samples(directory: Path) -> int:
    """Samples in the shards of a directory, from the tar headers alone."""
    keys = set()
    for path in shard_paths(directory):
        with tarfile.open(path) as tar:
            keys.update((path, name.split(".", 1)[0]) for name in tar.getnames())
    return len(keys)
