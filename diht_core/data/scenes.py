"""Synthetic scenes: 1-3 coloured shapes whose relations are visible."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.15, "large": 0.26}  # radius as a fraction of the canvas side
# as drawn: an arrow from A to B means "A chases B", overlap means "A touches B", B drawn inside A means "A holds B"
RELATIONS = ("chases", "touches", "holds")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the side
    y: float
    r: float  # radius, fraction of the side


@dataclass
class Scene:
    shapes: list[Shape]
    relation: dict | None = None  # {"type", "subject": idx, "object": idx}
    painted_text: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.shapes)

    def to_json(self) -> dict:
        return {
            "shapes": [asdict(s) for s in self.shapes],
            "relation": self.relation,
            "count": self.count,
            "painted_text": self.painted_text,
        }


def _side(x: float, y: float) -> str:
    dx, dy = x - 0.5, y - 0.5
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def side_of(s: Shape) -> str:
    return _side(s.x, s.y)


def description(scene: Scene) -> tuple:
    """What a scene's captions can say of it: each shape's shape, colour, size and side of the canvas, the relation
    with its roles (subject, object); shapes in no relation in any order. Two images of one description are the
    same scene to a caption (the true positives of each other), whatever their exact positions."""
    spec = [(s.shape, s.colour, s.size, side_of(s)) for s in scene.shapes]
    rel = scene.relation
    roles = (rel["type"], spec[rel["subject"]], spec[rel["object"]]) if rel else None
    return roles, tuple(sorted(spec))


def _free(rng, r, placed, margin=0.04, tries=200, side=None):
    """A centre clear of the placed shapes (and on `side` of the canvas, when given); None if none is found."""
    for _ in range(tries):
        x, y = rng.uniform(r + margin, 1 - r - margin, size=2)
        on_side = side is None or _side(x, y) == side
        if on_side and all(math.hypot(x - p.x, y - p.y) > r + p.r + margin for p in placed):
            return float(x), float(y)
    return None


def sample_scene(rng: np.random.Generator, count: int | None = None, relation: str | None = None,
                 single: Shape | None = None) -> Scene:
    """Sample a scene. count in {1,2,3}; relation in RELATIONS or None (random for count>=2)."""
    for _ in range(1000):  # a chase (the object near the centre, the subject far off) may need ~50 tries
        scene = _try_scene(rng, count, relation)
        if scene is not None:
            return scene
    raise RuntimeError("could not place shapes")  # practically unreachable


def _new_shape(rng, size=None, exclude_colours=(), fixed=None):
    if fixed is not None:  # (shape, colour, size, side) of a described scene
        return Shape(*fixed[:3], 0.0, 0.0, SIZES[fixed[2]])
    colours = [c for c in COLOURS if c not in exclude_colours]
    size = size or str(rng.choice(list(SIZES)))
    return Shape(str(rng.choice(SHAPES)), str(rng.choice(colours)), size, 0.0, 0.0, SIZES[size])


def relayout(scene: Scene, rng: np.random.Generator, tries: int = 1000) -> Scene | None:
    """The same description (shapes, colours, sizes, relation, each shape's side) at new positions; None when
    no placement is found in `tries`."""
    spec = [(s.shape, s.colour, s.size, side_of(s)) for s in scene.shapes]
    kind = scene.relation["type"] if scene.relation else None
    sides = [side_of(s) for s in scene.shapes]
    for _ in range(tries):
        new = _try_scene(rng, scene.count, kind, spec)
        if new is not None and [side_of(s) for s in new.shapes] == sides:
            return new
    return None


def _try_scene(rng, count, relation, spec=None) -> Scene | None:
    """A random scene; spec: the (shape, colour, size, side) of each shape, placed anew on its side."""
    n = int(count or rng.integers(1, 4))
    fixed = list(spec) if spec else [None] * n
    side = [f[3] if f else None for f in fixed]
    shapes: list[Shape] = []
    rel = None
    if n == 1:
        s = _new_shape(rng, fixed=fixed[0])
        pos = _free(rng, s.r, [], side=side[0])
        s.x, s.y = pos
        return Scene([s])
    kind = relation or str(rng.choice(RELATIONS))
    if kind == "holds":
        a = _new_shape(rng, "large", fixed=fixed[0])
        b = _new_shape(rng, "small", exclude_colours=(a.colour,), fixed=fixed[1])
        b.r = a.r * 0.42
        pos = _free(rng, a.r, [], side=side[0])
        if pos is None:
            return None
        a.x, a.y = pos
        b.x, b.y = a.x, a.y + (0.08 * a.r if a.shape == "triangle" else 0.0)
        shapes = [a, b]
    elif kind == "touches":
        a = _new_shape(rng, fixed=fixed[0])
        b = _new_shape(rng, exclude_colours=(a.colour,), fixed=fixed[1])
        pos = _free(rng, a.r, [], margin=0.02, side=side[0])
        if pos is None:
            return None
        a.x, a.y = pos
        d = 0.75 * (a.r + b.r)
        for _ in range(50):
            t = rng.uniform(0, 2 * math.pi)
            bx, by = a.x + d * math.cos(t), a.y + d * math.sin(t)
            if b.r < bx < 1 - b.r and b.r < by < 1 - b.r and side[1] in (None, _side(bx, by)):
                b.x, b.y = float(bx), float(by)
                break
        else:
            return None
        shapes = [a, b]
    else:  # chases: separate shapes, arrow from a to b
        a = _new_shape(rng, "small", fixed=fixed[0])
        b = _new_shape(rng, "small", exclude_colours=(a.colour,), fixed=fixed[1])
        pa = _free(rng, a.r, [], side=side[0])
        if pa is None:
            return None
        a.x, a.y = pa
        pb = _free(rng, b.r, [a], margin=0.22, side=side[1])
        if pb is None:
            return None
        b.x, b.y = pb
        shapes = [a, b]
    rel = {"type": kind, "subject": 0, "object": 1}
    if n == 3:
        c = _new_shape(rng, "small", fixed=fixed[2])
        pos = _free(rng, c.r, shapes, margin=0.05, side=side[2])
        if pos is None:
            return None
        c.x, c.y = pos
        shapes.append(c)
    return Scene(shapes, rel)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int):
    cx, cy, r = s.x * side, s.y * side, s.r * side
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(20, 20, 20))
    else:
        draw.polygon(_polygon(s.shape, cx, cy, r), fill=fill, outline=(20, 20, 20))


def _draw_arrow(draw: ImageDraw.ImageDraw, a: Shape, b: Shape, side: int):
    ax, ay, bx, by = a.x * side, a.y * side, b.x * side, b.y * side
    d = math.hypot(bx - ax, by - ay) or 1.0
    ux, uy = (bx - ax) / d, (by - ay) / d
    sx, sy = ax + ux * (a.r * side + 2), ay + uy * (a.r * side + 2)
    ex, ey = bx - ux * (b.r * side + 3), by - uy * (b.r * side + 3)
    w = max(2, side // 48)
    draw.line([(sx, sy), (ex, ey)], fill=(15, 15, 15), width=w)
    head = max(6, side // 14)
    px, py = -uy, ux
    draw.polygon([(ex + ux * 2, ey + uy * 2), (ex - ux * head + px * head * 0.6, ey - uy * head + py * head * 0.6),
                  (ex - ux * head - px * head * 0.6, ey - uy * head - py * head * 0.6)], fill=(15, 15, 15))


_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(px: int):
    if px not in _FONTS:
        try:
            _FONTS[px] = ImageFont.load_default(size=px)
        except Exception:  # Pillow without FreeType
            _FONTS[px] = ImageFont.load_default()
    return _FONTS[px]


def render(scene: Scene, side: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene on a lightly textured background."""
    base = rng.integers(200, 246, size=3)
    noise = rng.normal(0, 6, size=(side, side, 1))
    bg = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    order = list(range(scene.count))
    if scene.relation and scene.relation["type"] == "holds":
        order = [scene.relation["subject"]] + [i for i in order if i != scene.relation["subject"]]
    for i in order:
        _draw_shape(draw, scene.shapes[i], side)
    if scene.relation and scene.relation["type"] == "chases":
        _draw_arrow(draw, scene.shapes[scene.relation["subject"]], scene.shapes[scene.relation["object"]], side)
    if scene.painted_text:
        text = scene.painted_text.upper()
        px = max(10, side // 7)
        while px > 8 and draw.textlength(text, font=_font(px)) > side * 0.92:
            px -= 1
        font = _font(px)
        y = side * (0.04 if rng.random() < 0.5 else 0.82)
        draw.text((side * 0.04, y), text, fill=(10, 10, 10), font=font,
                  stroke_width=1, stroke_fill=(250, 250, 250))
    return img
