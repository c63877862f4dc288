"""Text spotting: a TextSpotter interface with RapidOCR (offline default) and docTR backends."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..config import CatFilterParams


class TextSpotter(Protocol):
    name: str

    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        """Spotted (text, confidence) pairs; empty when no text is found."""


class RapidOCRSpotter:
    """RapidOCR on onnxruntime; its models ship in the wheel. Recognition runs only on detected boxes.

    Python 3.11 and 3.12 install rapidocr-onnxruntime 1.4 (PP-OCRv4), which does not install on 3.13; there
    rapidocr 3 (PP-OCRv6, the same engine under its new name and API) is installed instead (pyproject.toml).
    min_side: images with a shorter side below it are scaled up to it (bicubic) before detection; RapidOCR's
    detector misses most words of 12-24 px on a 256 px image as it is (see the README's "Text-spotting
    threshold"). None: images are spotted at their own size. Images longer than limit_side_len are scaled down.
    """

    name = "rapidocr"

    def __init__(self, limit_side_len: int = 960, min_side: int | None = None):
        # limit_type "max": large images are scaled down, small ones are not blown up to 736 px
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            from rapidocr import RapidOCR

            self.engine = RapidOCR(params={"Global.use_cls": False, "Global.log_level": "error",
                                           "Det.limit_side_len": limit_side_len, "Det.limit_type": "max"})
            self.v3 = True
        else:
            self.engine = RapidOCR(use_cls=False, det_limit_side_len=limit_side_len, det_limit_type="max")
            self.v3 = False
        self.limit_side_len, self.min_side = limit_side_len, min_side

    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        image = image.convert("RGB")
        w, h = image.size
        if self.min_side and min(w, h) < self.min_side:
            scale = min(self.min_side / min(w, h), self.limit_side_len / max(w, h))
            if scale > 1:
                image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        arr = np.asarray(image)[:, :, ::-1]  # BGR, as OpenCV
        if self.v3:
            out = self.engine(arr, use_cls=False)
            return [(str(text), float(score)) for text, score in zip(out.txts or (), out.scores or ())]
        result, _ = self.engine(arr, use_cls=False)
        if not result:
            return []
        return [(str(text), float(score)) for _box, text, score in result]


class DocTRSpotter:
    """docTR's detection + recognition predictor, weights from local files only (never downloaded).

    ``weights`` is a directory holding ``<det_arch>*.pt`` and ``<reco_arch>*.pt`` state dicts, directly or in
    ``models/`` (docTR's own cache layout); default: ``$DOCTR_CACHE_DIR``.
    """

    name = "doctr"

    def __init__(self, weights: str | os.PathLike | None = None, det_arch: str = "db_resnet50",
                 reco_arch: str = "crnn_vgg16_bn"):
        root = weights or os.environ.get("DOCTR_CACHE_DIR")
        det, reco = (_find_weights(Path(root), det_arch), _find_weights(Path(root), reco_arch)) if root else (None, None)
        if det is None or reco is None:
            raise FileNotFoundError(
                f"docTR weights not found: put {det_arch}*.pt and {reco_arch}*.pt in $DOCTR_CACHE_DIR/models "
                f"or pass a directory; or use cat_filter.spotter=rapidocr (looked in {root})")
        import torch
        from doctr.models import detection, ocr_predictor, recognition

        det_model = detection.__dict__[det_arch](pretrained=False, pretrained_backbone=False)
        det_model.load_state_dict(torch.load(det, map_location="cpu", weights_only=True))
        reco_model = recognition.__dict__[reco_arch](pretrained=False, pretrained_backbone=False)
        reco_model.load_state_dict(torch.load(reco, map_location="cpu", weights_only=True))
        # docTR runs detection on every page and recognition only on the boxes it found
        self.predictor = ocr_predictor(det_model, reco_model, pretrained=False)

    def __call__(self, image: Image.Image) -> list[tuple[str, float]]:
        doc = self.predictor([np.asarray(image.convert("RGB"))])
        out = []
        for page in doc.pages:
            for block in page.blocks:
                for line in block.lines:
                    for word in line.words:
                        out.append((word.value, float(word.confidence)))
        return out


def _find_weights(root: Path, arch: str) -> Path | None:
    for d in (root, root / "models"):
        found = sorted(d.glob(f"{arch}*.pt")) if d.is_dir() else []
        if found:
            return found[0]
    return None


@lru_cache(maxsize=2)
def get_spotter(name: str = CatFilterParams().spotter, weights: str | None = None,
                min_side: int | None = CatFilterParams().spotter_min_side) -> TextSpotter:
    """The named backend; min_side applies to RapidOCR (docTR resizes every page to its own 1024 px)."""
    if name == "rapidocr":
        return RapidOCRSpotter(min_side=min_side)
    if name == "doctr":
        return DocTRSpotter(weights)
    raise ValueError(f"unknown text spotter {name!r}; use 'rapidocr' or 'doctr'")


def spot_text(image: Image.Image, spotter: str = CatFilterParams().spotter,
              min_side: int | None = CatFilterParams().spotter_min_side) -> list[tuple[str, float]]:
    """Spot text in one image with the named backend."""
    return get_spotter(spotter, min_side=min_side)(image)


def norm_text(s: str) -> str:
    """Lower case, no whitespace: what the matching rule compares."""
    return "".join(s.lower().split())


# min_confidence: null means the spotter's calibrated threshold. Each spotter scores a read on its own scale: the
# paper's 0.8 was its spotter's. rapidocr: bench/spotting_calibration.py on the labelled photo set
# (diht_core/cat/spotting_set.py), see the README's "Text-spotting threshold"; doctr: the paper's value,
# uncalibrated (no trained docTR weights are available offline to calibrate them).
CALIBRATED_MIN_CONFIDENCE = {"rapidocr": 0.75, "doctr": 0.8}


def min_confidence(cfg: CatFilterParams) -> float:
    """The confidence threshold in force: cfg.min_confidence, or the spotter's calibrated one when it is null."""
    return CALIBRATED_MIN_CONFIDENCE[cfg.spotter] if cfg.min_confidence is None else cfg.min_confidence


def caption_text_match(spotted, caption: str, cfg: CatFilterParams = CatFilterParams()) -> bool:
    """True if some spotted text of confidence >= min_confidence(cfg) shares >= cfg.min_chars consecutive
    characters with the caption.

    The comparison is a sliding window over the spotted text, ignoring case and whitespace.
    """
    return matched_text(spotted, caption, cfg) is not None


def matched_text(spotted, caption: str, cfg: CatFilterParams = CatFilterParams()) -> str | None:
    """The first matching window, or None."""
    return match_window(spotted, caption, min_confidence(cfg), cfg.min_chars)


def match_window(spotted, caption: str, min_conf: float, min_chars: int) -> str | None:
    """The first window of min_chars characters of a read of confidence >= min_conf that is in the caption."""
    cap = norm_text(caption)
    for text, conf in spotted:
        if conf < min_conf:
            continue
        t = norm_text(text)
        for i in range(len(t) - min_chars + 1):
            window = t[i:i + min_chars]
            if window in cap:
                return window
    return None
