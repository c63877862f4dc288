"""A labelled set for calibrating the text-spotting rule: real photos with text painted the way the web does.

The photos ship in installed wheels (matplotlib's ``grace_hopper.jpg``, scikit-learn's ``china.jpg`` and
``flower.jpg``); random crops of them get text painted at the crop's scale (small, no backing box, outlined on busy
regions, rotated, cut by the image edge) and are then resized to the download stage's 256 px (``border``), which is
what the CAT filter sees. Each sample pairs the image with a web-style caption and a label:

- ``drop`` (positive): a legible caption word (or a >= 5-letter piece of one) is painted: CAT must drop the pair;
- ``keep`` (negative): a near miss (the painted word shares only four consecutive characters with the caption), an
  unrelated overlay, or no text at all: CAT must keep the pair.

The set is a pure function of its seed (``build_spotting_set(seed, n)``); labels are checked against the matching
rule's own normalisation (``longest_common_run``) when the set is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.resize import resize
from .spotting import norm_text

SIDE = 256  # the download stage's default image_size; CAT sees this

CAPTIONS = (
    "tourists walking past the ancient temple on a summer morning",
    "a gardener planting yellow tulips beside the fountain",
    "children playing football in the village square",
    "a woman reading newspapers at the railway station",
    "fishermen repairing their nets on the harbour wall",
    "a chef slicing tomatoes in a restaurant kitchen",
    "two hikers climbing towards the mountain summit",
    "a photographer capturing the sunset over the lake",
    "students painting murals on the school building",
    "a musician playing guitar under the bridge",
    "volunteers cleaning plastic from the beach",
    "a grandmother knitting scarves by the window",
    "cyclists racing through the autumn forest",
    "a baker pulling fresh bread from the oven",
    "workers building a wooden cabin near the river",
    "a family sharing breakfast on the balcony",
    "dancers performing traditional steps at the festival",
    "a scientist examining flowers through a microscope",
    "shoppers browsing vegetables at the farmers market",
    "a teacher explaining geometry to curious pupils",
    "an officer presenting medals at the ceremony",
    "a potter shaping clay bowls in the workshop",
    "travellers boarding the evening ferry to the island",
    "a florist arranging orchids in a glass vase",
)

# overlays the web paints that are not caption words (kept only if they share <= 3 characters with the caption)
UNRELATED = ("SALE", "NEW", "50% OFF", "HD", "2019", "© studio", "best price", "click here", "www.pix.io",
             "LIMITED", "FREE", "top 10", "photo by jk", "ORIGINAL", "exclusive", "BUY NOW", "no. 7", "VIP")

# letters OCR confuses: a near miss made with one of them is the hard case for the confidence threshold
CONFUSABLE = {"a": "o", "o": "a", "e": "c", "c": "e", "n": "m", "m": "n", "i": "l", "l": "i", "r": "n", "u": "v",
              "v": "u", "h": "b", "b": "h", "t": "f", "f": "t", "s": "z", "g": "q", "y": "v", "k": "x", "d": "b"}

STYLES = ("plain", "small", "outlined", "rotated", "edge_cut")
CONTENTS = ("caption_word", "caption_piece", "two_words", "near_miss", "near_miss_four", "unrelated", "none")
POSITIVE_CONTENTS = ("caption_word", "caption_piece", "two_words")
MIN_MATCH = 5  # the paper's sliding window: the labels assume it
BANNER_COLOURS = ((200, 20, 20), (20, 60, 190), (0, 120, 40), (255, 220, 0), (255, 120, 0), (0, 220, 255))


@dataclass(frozen=True)
class SpottingSample:
    id: str
    image: Image.Image
    caption: str
    painted: str | None  # the text painted (None: no text)
    visible: str | None  # the characters fully inside the image (an edge cut hides the tail)
    content: str         # one of CONTENTS
    style: str           # one of STYLES ("none" when nothing is painted)
    drop: bool           # the label: CAT must drop the pair


def longest_common_run(a: str, b: str) -> int:
    """Length of the longest run of consecutive characters shared by a and b, compared as the rule does."""
    a, b = norm_text(a), norm_text(b)
    best, prev = 0, [0] * (len(b) + 1)
    for ca in a:
        cur = [0] * (len(b) + 1)
        for j, cb in enumerate(b, 1):
            if ca == cb:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


@lru_cache(maxsize=1)
def photos() -> tuple[Image.Image, ...]:
    """The real photos shipped in installed wheels (matplotlib, scikit-learn): no download."""
    paths = [_package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
             _package_dir("sklearn") / "datasets" / "images" / "china.jpg",
             _package_dir("sklearn") / "datasets" / "images" / "flower.jpg"]
    return tuple(Image.open(p).convert("RGB") for p in sorted(paths, key=lambda p: p.name))


def _package_dir(name: str) -> Path:
    """An installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the labelled spotting set needs the package {name} installed (its sample images)")
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=1)
def fonts() -> list[str | None]:
    """Font files available offline: DejaVu from matplotlib's wheel; None is Pillow's built-in font."""
    ttf = _package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf")
    return [str(ttf / n) for n in names if (ttf / n).exists()] + [None]


def _font(path: str | None, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px) if path is None else ImageFont.truetype(path, px)


def _words(caption: str) -> list[str]:
    return [w for w in caption.split() if len(w) >= MIN_MATCH and w.isalpha()]


def _content(kind: str, caption: str, rng: np.random.Generator) -> str | None:
    """The text to paint for one content kind; it satisfies the kind's label against the caption."""
    words = _words(caption)
    for _ in range(200):
        w = str(rng.choice(words))
        if kind == "caption_word":
            text = w
        elif kind == "caption_piece":  # a partial word: 5-6 letters of a longer caption word
            if len(w) < 7:
                continue
            k = int(rng.integers(5, 7))
            i = int(rng.integers(0, len(w) - k + 1))
            text = w[i:i + k]
        elif kind == "two_words":
            i = caption.split().index(w)
            rest = caption.split()[i + 1:i + 2]
            if not rest:
                continue
            text = f"{w} {rest[0]}"
        elif kind == "near_miss":  # one letter changed after (or before) four kept ones
            if len(w) > 8:
                continue
            i = 4 if rng.random() < 0.5 else len(w) - 5
            c = w[i]
            sub = CONFUSABLE.get(c, c) if rng.random() < 0.6 else str(rng.choice(list("abcdefghiklmnoprstuvwy")))
            if sub == c:
                continue
            text = w[:i] + sub + w[i + 1:]
        elif kind == "near_miss_four":  # only four letters of a caption word
            i = int(rng.integers(0, len(w) - 3))
            text = w[i:i + 4]
        elif kind == "unrelated":
            text = str(rng.choice(UNRELATED))
        else:
            return None
        run = longest_common_run(text, caption)
        if (kind in POSITIVE_CONTENTS and run >= MIN_MATCH) or (kind.startswith("near_miss") and run == 4) or (
                kind == "unrelated" and run <= 3):
            return text.upper() if rng.random() < 0.4 else text
    raise RuntimeError(f"no {kind} text found for caption {caption!r}")


def _crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    side = int(rng.integers(SIDE, min(w, h) + 1))
    cw = side if rng.random() < 0.7 else int(side * rng.uniform(0.7, 1.0))  # some non-square: border padding
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - side + 1))
    img = photo.crop((x, y, x + cw, y + side))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _region(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.convert("L").crop(box), dtype=np.float32)


def _colours(img: Image.Image, box, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """A fill contrasting with the region under box (sometimes a banner colour) and a stroke contrasting with it."""
    mean = float(_region(img, box).mean())
    fill = (int(rng.integers(0, 40)),) * 3 if mean > 128 else (int(rng.integers(225, 256)),) * 3
    if rng.random() < 0.35:
        colour = BANNER_COLOURS[int(rng.integers(len(BANNER_COLOURS)))]
        if abs(_luma(colour) - mean) > 100:
            fill = colour
    return fill, ((255, 255, 255) if _luma(fill) < 128 else (0, 0, 0))


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _masks(text: str, font, stroke_w: int, angle: float) -> tuple[Image.Image, Image.Image | None, int]:
    """Alpha masks of the glyphs and of their outline (None without one), rotated by angle; and the x offset of
    the text's start inside the (unrotated) masks."""
    pad = 2 + stroke_w
    l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font, stroke_width=stroke_w)
    size = (r - l + 2 * pad, b - t + 2 * pad)
    fill = Image.new("L", size, 0)
    ImageDraw.Draw(fill).text((pad - l, pad - t), text, fill=255, font=font)
    stroke = None
    if stroke_w:
        stroke = Image.new("L", size, 0)
        ImageDraw.Draw(stroke).text((pad - l, pad - t), text, fill=255, font=font, stroke_width=stroke_w,
                                    stroke_fill=255)
    if angle:
        fill = fill.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        stroke = stroke.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True) if stroke else None
    return fill, stroke, pad - l


def _paint(img: Image.Image, text: str, style: str, rng: np.random.Generator) -> str:
    """Paint text on img (in place) in the given style, without a backing box; returns the characters fully inside
    the image.

    Plain, small, rotated and edge-cut text goes on the calmest of a few candidate spots, in a colour contrasting
    with it (legible, as a designer places it); outlined text goes on the busiest spot, outlined.
    """
    scale = img.height / SIDE  # sizes are chosen as they look after the resize to SIDE
    font_path = fonts()[int(rng.integers(len(fonts())))]
    px_final = rng.uniform(10, 13) if style == "small" else rng.uniform(13, 24)
    stroke_w = max(1, int(round(rng.uniform(1.0, 2.0) * scale))) if style == "outlined" else 0
    angle = float(rng.choice([-1, 1]) * rng.uniform(10, 35)) if style == "rotated" else 0.0
    W, H = img.size
    px = max(8, int(round(px_final * scale)))
    # an edge cut runs off the right edge with at least six characters fully inside
    keep = len(text) if style != "edge_cut" or len(text) <= MIN_MATCH + 1 else max(MIN_MATCH + 1, len(text) - 2)
    while True:  # the text fits (a rotated one at its angle; an edge-cut one up to its cut)
        font = _font(font_path, px)
        fill_mask, stroke_mask, x0 = _masks(text, font, stroke_w, angle)
        mw, mh = fill_mask.size
        inside = x0 + font.getlength(text[:keep]) if style == "edge_cut" else mw
        if (inside <= 0.92 * W and mh <= 0.9 * H) or px <= 8:
            break
        px -= 1
    if style == "edge_cut":
        xs = [int(W - inside - rng.uniform(0.05, 0.3) * font.size)] * 8
    else:
        xs = [int(rng.integers(0, max(1, W - mw))) for _ in range(8)]
    spots = [(x, int(rng.integers(0, max(1, H - mh)))) for x in xs]
    boxes = [(max(0, x), y, min(W, x + mw), min(H, y + mh)) for x, y in spots]
    texture = [float(_region(img, bx).std()) for bx in boxes]
    k = int(np.argmax(texture)) if style == "outlined" else int(np.argmin(texture))
    fill, stroke = _colours(img, boxes[k], rng)
    if stroke_mask is not None:
        img.paste(stroke, spots[k], stroke_mask)
    img.paste(fill, spots[k], fill_mask)
    return text[:keep]


def build_spotting_set(seed: int = 0, n: int = 240) -> list[SpottingSample]:
    """n labelled samples, about half positives, as a pure function of seed.

    Contents cycle so that each style meets each content: positives (caption word, a piece of one, two caption
    words) and negatives (near misses with one changed letter, four letters of a caption word, unrelated overlays,
    no text), painted plain, small, outlined, rotated or cut by the right edge.
    """
    rng = np.random.default_rng(seed)
    src = photos()
    weights = {"caption_word": 3, "caption_piece": 2, "two_words": 1, "near_miss": 3, "near_miss_four": 1,
               "unrelated": 1, "none": 1}
    cycle = [c for c, k in weights.items() for _ in range(k)]
    out = []
    for i in range(n):
        content = cycle[i % len(cycle)]
        style = STYLES[(i // len(cycle) + i) % len(STYLES)] if content != "none" else "none"
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
        img = _crop(src[int(rng.integers(len(src)))], rng)
        text = _content(content, caption, rng)
        visible = _paint(img, text, style, rng) if text else None
        drop = content in POSITIVE_CONTENTS and longest_common_run(visible, caption) >= MIN_MATCH
        assert drop == (content in POSITIVE_CONTENTS), (content, visible, caption)
        out.append(SpottingSample(f"{i:04d}", resize(img, "border", SIDE), caption, text, visible, content, style,
                                  drop))
    return out
