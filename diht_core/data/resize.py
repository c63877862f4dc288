"""Decode downloaded bytes safely and resize them in img2dataset's modes."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from ..config import UrlListParams

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


_ADDRESS = re.compile(r" <[^<>]* at 0x[0-9a-f]+>")  # PIL names the BytesIO it read: "<_io.BytesIO object at 0x7f..>"


class ImageError(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image of data; ImageError("decompression_bomb" | "decode_error") otherwise.

    The size in the header is checked before any pixel is decoded, PIL's own bomb guard is an
    error here (not a warning), the file is verified and then fully decoded (a truncated file fails).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("decompression_bomb", f"{w}x{h} pixels > max_pixels {max_pixels}")
            img.verify()
            img = Image.open(io.BytesIO(data))  # verify() leaves the image unusable
            img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError("decompression_bomb", str(err)) from None
        except Exception as err:  # PIL raises many types for corrupt data
            message = _ADDRESS.sub("", f"{type(err).__name__}: {err}")  # the same message on every run
            raise ImageError("decode_error", message) from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is matted on white, as img2dataset does."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, mode: str, size: int = UrlListParams().image_size,
           only_if_bigger: bool = UrlListParams().resize_only_if_bigger) -> Image.Image:
    """img resized in one of img2dataset's modes (its names and geometry; `size` defaults to 256 there).

    - no: keep the image as it is;
    - keep_ratio: the smaller side becomes size;
    - keep_ratio_largest: the larger side becomes size;
    - center_crop: the smaller side becomes size, then the centre size x size is cut out;
    - border: the larger side becomes size, then black borders pad it to size x size.
    With only_if_bigger, an image that would be enlarged is left as it is.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; one of {RESIZE_MODES}")
    if mode == "no":
        return img
    w, h = img.size
    side = min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h)
    scale = size / side
    if only_if_bigger and scale >= 1:
        return img
    if scale != 1:  # area averaging down (cv2's INTER_AREA), Lanczos up, as img2dataset
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(new, Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS)
    w, h = img.size
    if mode == "center_crop":
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        img = canvas
    return img
