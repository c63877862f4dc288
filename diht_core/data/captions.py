"""A caption grammar of varying complexity for synthetic scenes, plus junk captions."""

from __future__ import annotations

import numpy as np

from .scenes import COUNT_WORDS, Scene, Shape, side_of

VERB_FORMS = {
    # active present, progressive, participle-modifier (subject first), passive (object first)
    "chases": ("chases", "is chasing", "chasing", "chased by"),
    "touches": ("touches", "is touching", "touching", "touched by"),
    "holds": ("holds", "is holding", "holding", "held by"),
}
SINGLE_VERBS = ("sits on the {side}", "rests on the {side}", "is sitting on the {side}",
                "resting on the {side}", "floats near the {side}", "stands at the {side}")
JUNK = (
    "premium quality wall sticker {a}x{b} cm",
    "stock photo id {a}{b}",
    "free shipping on all orders over ${a}",
    "best price guaranteed, item {a}-{b}",
    "vector illustration set of colourful icons",
    "new arrival summer collection {y}",
    "high resolution wallpaper {a}x{b}",
    "limited edition poster, size {a}",
    "copyright {y}, all rights reserved",
    "official store: product {a}{b} in stock",
)


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def noun_phrase(s: Shape, rng: np.random.Generator) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(s.size)
    if rng.random() < 0.92:
        words.append(s.colour)
    words.append(s.shape)
    return with_article(" ".join(words))


def _count_prefix(n: int, rng) -> str:
    noun = "shape" if n == 1 else "shapes"
    w = COUNT_WORDS[n]
    return str(rng.choice([f"{w} {noun}: ", f"a picture of {w} {noun} where "]))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption drawn from the grammar; complexity varies with the optional modifiers."""
    shapes, rel = scene.shapes, scene.relation
    if rel is None:
        s = shapes[0]
        clause = f"{noun_phrase(s, rng)} " + str(rng.choice(SINGLE_VERBS)).format(side=side_of(s))
    else:
        a, b = shapes[rel["subject"]], shapes[rel["object"]]
        present, progressive, participle, passive = VERB_FORMS[rel["type"]]
        form = int(rng.integers(4))
        na, nb = noun_phrase(a, rng), noun_phrase(b, rng)
        if form == 0:
            clause = f"{na} {present} {nb}"
        elif form == 1:
            clause = f"{na} {progressive} {nb}"
        elif form == 2:
            clause = f"{na} {participle} {nb}"
        else:
            clause = f"{nb} {passive} {na}"
        if len(shapes) == 3 and rng.random() < 0.6:
            c = shapes[2]
            clause += str(rng.choice([" next to {np}", ", with {np} on the {side}", " near {np}"])).format(
                np=noun_phrase(c, rng), side=side_of(c))
    if rng.random() < 0.5:
        clause = _count_prefix(len(shapes), rng) + clause
    return clause


def paraphrases(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """n distinct captions of the same scene (as distinct as the grammar allows)."""
    out: list[str] = []
    for _ in range(20 * n):
        c = caption(scene, rng)
        if c not in out:
            out.append(c)
        if len(out) == n:
            break
    return out


def junk_caption(rng: np.random.Generator) -> str:
    t = str(rng.choice(JUNK))
    return t.format(a=int(rng.integers(10, 999)), b=int(rng.integers(10, 999)), y=int(rng.integers(2005, 2024)))


def painted_words(scene: Scene, rng: np.random.Generator) -> str:
    """Words of the caption to paint into the image: the text-spotting shortcut."""
    s = scene.shapes[0]
    return str(rng.choice([f"{s.colour} {s.shape}", f"{s.colour} {s.shape}s", f"{s.size} {s.colour} {s.shape}"]))
