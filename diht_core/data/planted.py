"""The planted truth of synthetic training samples, read from each sample's json: which images share a scene
description (``scene_id``), which visible concepts the captions omit (``omitted``) and the concepts truly in the
image (its ``shapes``: shape names, colour and size words). Data without it (a URL list) has none of it: -1, None."""

from __future__ import annotations

from pathlib import Path

from .scenes import COLOURS, SHAPES, SIZES
from .shards import as_integer, iter_shard, parse_sample, shard_paths

NO_SCENE = -1  # the scene_id of a sample whose json carries none
CONCEPTS = frozenset(SHAPES) | frozenset(COLOURS) | frozenset(SIZES)  # every concept the planted truth can name


def scene_id(meta: dict | None) -> int:
    """The sample's ``scene_id`` (an integer >= 0), NO_SCENE when its json has none."""
    sid = as_integer((meta or {}).get("scene_id"))
    return sid if sid is not None and sid >= 0 else NO_SCENE


def planted_noise(meta: dict | None) -> str | None:
    """The sample's planted noise kind (``noise``: clean, junk, text_in_image, mismatched); None when its json has
    none."""
    kind = (meta or {}).get("noise")
    return kind if isinstance(kind, str) else None


def swap_family(meta: dict | None) -> tuple | None:
    """The compositional hard-negative family of a sample: the relation and the words of its related shapes (their
    shape names and colours, each as a set), and any third shape's. Two images of one family whose scene ids
    differ are each other's planted hard negatives: the same words with roles or colours swapped (what the
    compositional test asks), or the same binding at other sizes or sides. None: no relation (one shape), or no
    planted scene in the json."""
    shapes, rel = (meta or {}).get("shapes") or [], (meta or {}).get("relation")
    if not rel or len(shapes) < 2:
        return None
    pair = [shapes[rel["subject"]], shapes[rel["object"]]]
    rest = tuple(sorted((s["shape"], s["colour"]) for i, s in enumerate(shapes)
                        if i not in (rel["subject"], rel["object"])))
    return (rel["type"], tuple(sorted(s["shape"] for s in pair)), tuple(sorted(s["colour"] for s in pair)), rest)


def true_concepts(meta: dict) -> set[str]:
    """The concepts truly in the image: the shape name, colour and size word of each of its shapes."""
    return {s[field] for s in meta.get("shapes") or [] for field in ("shape", "colour", "size") if s.get(field)}


def planted_concepts(meta: dict | None) -> dict | None:
    """{"true": concepts in the image, "omitted": those named in none of the captions}; None without ``omitted``."""
    if not meta or not isinstance(meta.get("omitted"), list):
        return None
    return {"true": true_concepts(meta), "omitted": set(meta["omitted"])}


def ratio(num, den) -> float | None:
    """num / den as a float (numbers or 0-d tensors); None when den is 0: nothing to judge (e.g. no pair mined)."""
    return float(num) / float(den) if float(den) > 0 else None


def read_planted_concepts(shard_dir: str | Path) -> dict[str, dict]:
    """{key: planted_concepts} of every sample of the shards in shard_dir that carries them (no image decoded);
    {} when there are none (or no shards)."""
    out = {}
    for path in shard_paths(shard_dir):
        for raw in iter_shard(path):
            s = parse_sample(raw)
            truth = planted_concepts(s.get("json")) if s["fault"] is None else None
            if truth is not None:
                out[s["key"]] = truth
    return out
