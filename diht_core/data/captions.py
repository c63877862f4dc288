"""A caption grammar of varying complexity for synthetic scenes, junk captions, and the concept words a caption
names."""

from __future__ import annotations

import re

import numpy as np

from .scenes import COLOURS, COUNT_WORDS, SHAPES, SIZES, Scene, Shape, side_of

VERB_FORMS = {
    # active present, progressive, participle-modifier (subject first), passive (object first)
    "chases": ("chases", "is chasing", "chasing", "chased by"),
    "touches": ("touches", "is touching", "touching", "touched by"),
    "holds": ("holds", "is holding", "holding", "held by"),
}
THIRD_SHAPE = (" next to {np}", ", with {np} on the {side}", " near {np}")
SINGLE_VERBS = ("sits on the {side}", "rests on the {side}", "is sitting on the {side}",
                "resting on the {side}", "floats near the {side}", "stands at the {side}",
                "lies on the {side} side", "hovers near the {side} edge", "is placed on the {side}",
                "waits at the {side}", "appears on the {side} side", "is resting near the {side}",
                "stays at the {side} edge", "is floating on the {side}", "sits near the {side} side",
                "stands on the {side} half")
COUNT_PREFIXES = ("{w} {noun}: ", "a picture of {w} {noun} where ", "in this picture of {w} {noun}, ",
                  "{w} {noun} in the picture: ", "a drawing of {w} {noun} where ", "{w} {noun}, and ")
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


def noun_phrase(s: Shape, rng: np.random.Generator, omit_prob: float = 0.0) -> str:
    """"a small red circle"; the size and the colour word each left out with probability omit_prob (two draws
    either way, so the rest of the caption does not depend on omit_prob's value)."""
    keep_size, keep_colour = rng.random() >= omit_prob, rng.random() >= omit_prob
    words = [s.size] * keep_size + [s.colour] * keep_colour + [s.shape]
    return with_article(" ".join(words))


def _count_prefix(n: int, rng) -> str:
    noun = "shape" if n == 1 else "shapes"
    w = COUNT_WORDS[n]
    return str(rng.choice(COUNT_PREFIXES)).format(w=w, noun=noun)


def caption(scene: Scene, rng: np.random.Generator, omit_prob: float = 0.0, diverse: bool = True) -> str:
    """One caption of the scene. diverse: drawn from the grammar (verb forms, modifiers, count prefixes), else the
    one fixed template of its scene type. omit_prob: each attribute word, and the third shape, left out with this
    probability (alt-text leaves out what is visible)."""
    if not diverse:
        return template_caption(scene, rng, omit_prob)
    shapes, rel = scene.shapes, scene.relation
    if rel is None:
        s = shapes[0]
        clause = f"{noun_phrase(s, rng, omit_prob)} " + str(rng.choice(SINGLE_VERBS)).format(side=side_of(s))
    else:
        a, b = shapes[rel["subject"]], shapes[rel["object"]]
        form = int(rng.integers(4))
        clause = relation_clause(noun_phrase(a, rng, omit_prob), rel["type"], noun_phrase(b, rng, omit_prob), form)
        if len(shapes) == 3:
            c = shapes[2]
            mention, extra = rng.random() >= omit_prob, str(rng.choice(THIRD_SHAPE))
            third = extra.format(np=noun_phrase(c, rng, omit_prob), side=side_of(c))
            clause += third if mention else ""
    if rng.random() < 0.5:
        clause = _count_prefix(len(shapes), rng) + clause
    return clause


def relation_clause(subject: str, relation: str, obj: str, form: int = 0) -> str:
    """"<subject> <verb> <object>" in one of the four VERB_FORMS (3: passive, the object first)."""
    verb = VERB_FORMS[relation][form]
    return f"{obj} {verb} {subject}" if form == 3 else f"{subject} {verb} {obj}"


def template_caption(scene: Scene, rng: np.random.Generator, omit_prob: float = 0.0) -> str:
    """The fixed template of the scene's type (no phrasing varies): distinct scenes often share a caption."""
    shapes, rel = scene.shapes, scene.relation
    nps = [noun_phrase(s, rng, omit_prob) for s in shapes]
    if rel is None:
        return f"{nps[0]} sits in the picture"
    clause = relation_clause(nps[rel["subject"]], rel["type"], nps[rel["object"]])
    mention = rng.random() >= omit_prob
    return clause + (f" next to {nps[2]}" if len(shapes) == 3 and mention else "")


def paraphrases(scene: Scene, rng: np.random.Generator, n: int, omit_prob: float = 0.0,
                diverse: bool = True) -> list[str]:
    """n distinct captions of the same scene (as distinct as the grammar allows; caption's arguments)."""
    out: list[str] = []
    for _ in range(20 * n):
        c = caption(scene, rng, omit_prob, diverse)
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


# Diverse junk (download.world.junk_style: diverse): web alt-text that says little about the image.
NP_PREFIXES = ("geometric", "simple", "flat", "abstract", "cute", "bright", "3d", "minimal", "colorful", "hand drawn",
               "modern", "retro", "glossy", "tiny")
NP_SUFFIXES = ("icon", "clipart", "png", "vector", "image", "illustration", "graphic", "design", "sticker", "logo",
               "on white background", "pattern", "symbol", "emoji", "stock image", "isolated", "clip art", "silhouette",
               "wallpaper", "drawing")
PRODUCTS = ("cushion", "earrings", "cookie cutter", "wall decal", "pendant", "mug", "keychain", "sticker", "rug",
            "lamp", "phone case", "puzzle", "magnet", "tote bag", "t-shirt", "necklace", "mold", "stencil", "balloon",
            "pillow")
LISTING_LEADS = ("SALE", "NEW", "HOT SALE", "{pct}% OFF", "Best seller:", "Clearance:", "Top rated", "Bundle:",
                 "Lot of {n}", "Deal:")
LISTING_TAILS = ("free shipping", "in stock", "only ${price}", "size {a}x{b} cm", "pack of {n}",
                 "delivery in {d} days", "{pct}% off today", "limited stock", "gift idea", "{n} colours available",
                 "item #{a}{b}", "SKU {a}-{b}")
LISTING_FORMS = ("{lead} {n}x {item}, {tail}", "{item} - {tail}", "{lead} {item} {a}x{b} cm",
                 "{n} pcs {item} set, {tail}", "{item} | {tail} | {tail2}", "{lead} {item} ({tail})")
PAINTED_A = ("summer", "happy", "open", "big", "best", "super", "hello", "good", "grand", "mega", "final", "daily",
             "fresh", "lucky", "golden", "weekend", "night", "spring")
PAINTED_B = ("sale", "vibes", "deals", "news", "day", "friday", "offer", "party", "market", "special", "club",
             "studio", "time", "moments", "fair", "week", "music", "games")
PAINTED_FORMS = ("{w1} {w2}", "{w1} {w2} {y}", "{w2} {n}", "{w1} {w2} no {n}", "{w1} {w2}!")


def _numbers(rng: np.random.Generator) -> dict:
    return {"n": int(rng.integers(2, 13)), "a": int(rng.integers(10, 99)), "b": int(rng.integers(10, 99)),
            "pct": int(rng.choice([10, 15, 20, 25, 30, 40, 50, 60, 70])), "price": int(rng.integers(3, 80)),
            "d": int(rng.integers(2, 15)), "y": int(rng.integers(2005, 2025))}


def junk_noun_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """A bare noun phrase of some of what is shown, with web decoration ("geometric red star icon png"): no action."""
    s = scene.shapes[int(rng.integers(scene.count))]
    words = [w for w, keep in ((s.size, rng.random() < 0.3), (s.colour, rng.random() < 0.7)) if keep]
    plural = rng.random() < 0.25
    core = " ".join(words + [s.shape + "s" * plural])
    if rng.random() < 0.4:
        core = f"{str(rng.choice(NP_PREFIXES))} {core}"
    if rng.random() < 0.75:
        core = f"{core} {str(rng.choice(NP_SUFFIXES))}"
    if rng.random() < 0.15:
        core = f"{core} {int(rng.integers(16, 1025))}px"
    return with_article(core) if rng.random() < 0.3 and not plural else core


def product_listing(scene: Scene, rng: np.random.Generator) -> str:
    """Listing text naming a colour and a shape that are NOT in the image ("SALE 3x blue star mug, free shipping")."""
    colours = [c for c in COLOURS if c not in {s.colour for s in scene.shapes}]
    shapes = [c for c in SHAPES if c not in {s.shape for s in scene.shapes}]
    item = f"{str(rng.choice(colours))} {str(rng.choice(shapes))} {str(rng.choice(PRODUCTS))}"
    nums = _numbers(rng)
    lead, tail, tail2 = (str(rng.choice(x)).format(**nums) for x in (LISTING_LEADS, LISTING_TAILS, LISTING_TAILS))
    return str(rng.choice(LISTING_FORMS)).format(lead=lead, item=item, tail=tail, tail2=tail2, **nums)


def painted_slogan(rng: np.random.Generator) -> str:
    """Short text to paint into an image whose caption is that text only ("summer vibes 2019")."""
    return str(rng.choice(PAINTED_FORMS)).format(w1=str(rng.choice(PAINTED_A)), w2=str(rng.choice(PAINTED_B)),
                                                 **_numbers(rng))


# The concept words of the synthetic world, as the concept vocabulary lemmatises them (diht_core/concepts).
CONCEPT_WORDS = frozenset(SHAPES) | frozenset(COLOURS) | frozenset(SIZES)


def named_concepts(text: str) -> set[str]:
    """The concept words a text names (plurals as their singular: "stars" names "star")."""
    words = re.findall(r"[a-z]+", text.lower())
    return {w[:-1] if w not in CONCEPT_WORDS and w[:-1] in CONCEPT_WORDS else w for w in words} & CONCEPT_WORDS


def visible_concepts(scene: Scene) -> set[str]:
    """The concept words an image shows: its shapes' names, colours and sizes."""
    return {w for s in scene.shapes for w in (s.shape, s.colour, s.size)}


def omitted_concepts(scene: Scene, captions: list[str]) -> list[str]:
    """The concepts the image shows that none of its captions names, sorted."""
    named = set().union(*(named_concepts(c) for c in captions))
    return sorted(visible_concepts(scene) - named)
