"""Webdataset shards: the one reader and writer every stage uses, and image decoding."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Iterator

from PIL import Image

from .files import atomic_path


def shard_paths(directory: str | Path) -> list[Path]:
    """The .tar shards of a directory, sorted."""
    return sorted(Path(directory).glob("*.tar"))


def encode_jpg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB (PIL's own size limit only); raises ValueError (a SampleFault) on a corrupt image."""
    return open_image(data, None)


def write_shard(path: str | Path, samples: list[dict]) -> None:
    """Write samples ({"__key__", ext: bytes | str | dict | int}) atomically to one tar, byte for byte what
    webdataset's ``TarWriter(mtime=0.0)`` writes (members in sorted extension order, mode 0444, owner "bigdata",
    a fixed mtime: the same samples give the same bytes); written here so that writing a shard needs no torch."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for s in samples:
            key = s["__key__"]
            for ext in sorted(k for k in s if not k.startswith("_")):
                data = _member_bytes(s[ext], ext)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0.0, 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))


def _member_bytes(value, ext: str) -> bytes:
    """A sample's value as the bytes of its tar member (webdataset's encoding of these types)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)) and ext in ("json", "jsn"):
        return json.dumps(value).encode("utf-8")
    if isinstance(value, int) and ext in ("cls", "cls2", "class", "count", "index", "inx", "id"):
        return str(value).encode("ascii")
    raise ValueError(f"{ext}: cannot store a {type(value).__name__} in a shard (bytes, str, json dict, int cls)")


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """A member name split into (sample key, extensions) at the first dot of its last path part, as webdataset
    groups members; (None, None) for a name without extension."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


# What makes one sample unusable, checked in this order: its json, its caption, its image (the header size first)
FAULTS = ("bad_json", "missing_caption", "empty_caption", "bad_image", "too_many_pixels")
BAD_LABEL = "bad_label"  # a missing or non-integer cls, a fault only where a label is needed (need_label)
IMAGE_EXTS = ("jpg", "png", "webp", "jpeg")  # the first one a sample has is its image


def image_ext(raw: dict) -> str | None:
    """The member of a raw sample that holds its image (see IMAGE_EXTS), None without one."""
    return next((ext for ext in IMAGE_EXTS if ext in raw), None)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as webdataset skips them
_BLOCK = tarfile.BLOCKSIZE


class SampleFault(ValueError):
    """One sample is unusable; ``reason`` is one of FAULTS."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def _members(path: Path) -> Iterator[tuple[str | None, bytes | str, int]]:
    """(name, bytes, data offset) of the regular members of a tar, in order; a last (None, error, -1) when the tar
    stops before its end-of-archive block (cut, even at a header boundary, or a corrupt header: the rest is lost)."""
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for m in tar:
                    if m.isreg() and not _META.match(m.name):
                        yield m.name, tar.extractfile(m).read(), m.offset_data
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(_BLOCK) != bytes(_BLOCK):
                    raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            yield None, f"{type(err).__name__}: {err}", -1


def iter_shard(path: str | Path, offsets: bool = False) -> Iterator[dict]:
    """Raw samples of one shard (webdataset's grouping: ``__key__``, ``__url__``, ext -> bytes), in order; with
    ``offsets``, also ``__offsets__``: ext -> (data offset, size) in the tar (for reading a member again later).

    A truncated shard ends with a record {"__key__": None, "__url__", "__truncated__": {"read": samples before the
    cut, "error"}} instead of raising; the sample being read at the cut is yielded as far as it was read."""
    current, read = None, 0
    for name, data, offset in _members(Path(path)):
        if name is None:
            if current is not None:
                yield current
            yield {"__key__": None, "__url__": str(path), "__truncated__": {"read": read + (current is not None),
                                                                           "error": data}}
            return
        key, ext = base_plus_ext(name)
        if key is None:  # a member without an extension belongs to no sample
            continue
        if current is not None and key != current["__key__"]:
            read += 1
            yield current
            current = None
        current = current or {"__key__": key, "__url__": str(path), **({"__offsets__": {}} if offsets else {})}
        if ext.lower() not in current:  # a duplicate member: the first one counts
            current[ext.lower()] = data
            if offsets:
                current["__offsets__"][ext.lower()] = (offset, len(data))
    if current is not None:
        yield current


def pixel_limit(max_pixels: int | None) -> int:
    """The pixel limit to apply: max_pixels, or PIL's own decompression-bomb limit when it is None."""
    return max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or sys.maxsize)


def open_image(data: bytes | None, max_pixels: int | None) -> Image.Image:
    """RGB image of these bytes. SampleFault("too_many_pixels") when the header's width x height exceeds max_pixels
    (before any pixel is decoded; None: PIL's own limit only), SampleFault("bad_image") when it is missing or does
    not decode."""
    return _decoded(_header(data, max_pixels)).convert("RGB")


def check_image(data: bytes | None, max_pixels: int | None) -> None:
    """Raise the SampleFault open_image would, decoding as little as the format allows (a JPEG at 1/8 scale: every
    byte is still entropy-decoded, so a cut or corrupt one fails as in full) and keeping nothing."""
    img = _header(data, max_pixels)
    img.draft("RGB", (1, 1))  # JPEG only; a no-op for the other formats
    _decoded(img)


def _header(data: bytes | None, max_pixels: int | None) -> Image.Image:
    """The image of these bytes with only its header read, its size checked against max_pixels."""
    if data is None:
        raise SampleFault("bad_image", "no image member (jpg, png or webp)")
    try:
        with warnings.catch_warnings():  # max_pixels is the limit here, not PIL's warning (its error stays)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:
        raise SampleFault("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises several types for corrupt data
        raise SampleFault("bad_image", f"{type(err).__name__}: {err}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise SampleFault("too_many_pixels", f"{w}x{h} pixels > max_pixels {max_pixels}")
    return img


def _decoded(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as err:
        raise SampleFault("bad_image", f"{type(err).__name__}: {err}") from None
    return img


def _json_object(data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SampleFault("bad_json", f"{type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise SampleFault("bad_json", f"a JSON {type(obj).__name__}, not an object")
    return obj


def sample_captions(s: dict) -> list[str]:
    """The captions of a parsed sample: its json's "captions" when non-empty, else its txt; blank ones dropped.
    SampleFault("missing_caption" | "empty_caption" | "bad_json")."""
    captions = (s.get("json") or {}).get("captions")
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise SampleFault("bad_json", "json \"captions\" is not a list of strings")
    if not captions:
        if "txt" not in s:
            raise SampleFault("missing_caption", "no txt member and no json \"captions\"")
        captions = [s["txt"]]
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise SampleFault("empty_caption", "every caption is blank")
    return captions


def as_integer(value) -> int | None:
    """An int, or a str or bytes holding one (surrounding whitespace allowed), as an int; None for anything else
    (nothing, a bool, a float, a word): a label read from data, never an exception."""
    if isinstance(value, bool) or not isinstance(value, (int, str, bytes)):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def parse_sample(raw: dict, max_pixels: int | None = None, need_caption: bool = False, need_label: bool = False,
                 check_only: bool = False) -> dict:
    """A raw sample's fields: key, shard, image_bytes, txt, json (an object), cls (when an integer), captions
    (need_caption), pil (an RGB image, decoded when max_pixels is given; with check_only the image is only checked,
    see check_image, and not kept), and ``fault``: None or a reason of FAULTS, or BAD_LABEL with need_label
    (``error``: the detail). A truncation record (see iter_shard) becomes {"key": None, "shard", "fault":
    "truncated", "read", "error"}. Never raises on bad data."""
    if "__truncated__" in raw:
        return {"key": None, "shard": raw["__url__"], "fault": "truncated", **raw["__truncated__"]}
    s = {"key": raw["__key__"], "shard": raw.get("__url__"), "fault": None}
    image = raw.get(image_ext(raw))
    if image is not None:
        s["image_bytes"] = image
    if "txt" in raw:
        s["txt"] = raw["txt"].decode("utf-8", errors="replace")
    if as_integer(raw.get("cls")) is not None:
        s["cls"] = as_integer(raw["cls"])
    try:
        if "json" in raw:
            s["json"] = _json_object(raw["json"])
        if need_label and "cls" not in s:
            raise SampleFault(BAD_LABEL, f"cls {raw['cls'][:20]!r} is not an integer" if "cls" in raw else "no cls")
        if need_caption:
            s["captions"] = sample_captions(s)
        if max_pixels is not None and check_only:
            check_image(image, max_pixels)
        elif max_pixels is not None:
            s["pil"] = open_image(image, max_pixels)
    except SampleFault as fault:
        s["fault"], s["error"] = fault.reason, fault.message
    return s


class Faults:
    """What a stage skipped: samples per reason (FAULTS and any the stage adds) and the truncated shards (shard
    name -> {"read": samples read before the cut, "error"})."""

    def __init__(self):
        self.by_reason: dict[str, int] = {}
        self.truncated: dict[str, dict] = {}

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def count(self, reason: str, n: int = 1) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n

    def skip(self, s: dict) -> bool:
        """Count a parsed sample that has a fault (or a truncation record, reported on stderr); True when the caller
        must skip it."""
        if s["fault"] is None:
            return False
        if s["fault"] == "truncated":
            name = Path(s["shard"]).name
            self.truncated[name] = {"read": s["read"], "error": s["error"]}
            print(f"[shards] {s['shard']} is truncated after {s['read']} samples; the rest is lost ({s['error']})",
                  file=sys.stderr)
        else:
            self.count(s["fault"])
        return True

    def merge(self, by_reason: dict, truncated: dict) -> None:
        for reason, n in by_reason.items():
            self.count(reason, n)
        self.truncated.update(truncated)

    def summary(self) -> str:
        return f"skipped by reason {self.by_reason}, truncated shards {self.truncated}"

    def report(self) -> dict:
        """skipped_samples, skipped_by_reason and truncated_shards as the metrics report them; {} when nothing was
        skipped."""
        if not (self.skipped or self.truncated):
            return {}
        return {"skipped_samples": self.skipped, "skipped_by_reason": dict(self.by_reason),
                "truncated_shards": dict(self.truncated)}


def skip_or_fail(s: dict, faults: Faults | None) -> bool:
    """True when a parsed sample has a fault (or is a truncation record), counted in ``faults``; without ``faults``
    the fault is an error naming the shard, the key and the reason."""
    if s["fault"] is None:
        return False
    if faults is not None:
        return faults.skip(s)
    what = "is truncated" if s["key"] is None else f"sample {s['key']!r}: {s['fault']}"
    raise ValueError(f"{s['shard']} {what} ({s['error']})")


def read_samples(path: str | Path, max_pixels: int | None = None, need_caption: bool = False,
                 need_label: bool = False, check_only: bool = False) -> Iterator[dict]:
    """The samples of one shard, parsed (``parse_sample``), a truncation record last if the shard is cut."""
    for raw in iter_shard(path):
        yield parse_sample(raw, max_pixels, need_caption, need_label, check_only)


def no_sample_left(kept, where, faults: Faults | None) -> None:
    """The error of a split or dataset none of whose samples is usable (nothing when ``kept`` is non-empty)."""
    if not len(kept):
        raise ValueError(f"no usable sample in {where}: {faults.summary() if faults else 'no samples'}")


def count_samples(directory: Path) -> int:
    """Samples in the shards of a directory, from the tar headers alone."""
    keys = set()
    for path in shard_paths(directory):
        with tarfile.open(path) as tar:
            try:
                for m in tar:
                    keys.add((path, m.name.split(".", 1)[0]))
            except tarfile.ReadError:  # a truncated shard: the samples before the cut
                pass
    return len(keys)
