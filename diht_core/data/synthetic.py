"""The built-in synthetic image-caption dataset, deterministic from a seed."""

from __future__ import annotations

import json
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DownloadParams, WorldParams
from .files import atomic_write_text
from .captions import (VERB_FORMS, caption, junk_caption, junk_noun_phrase, omitted_concepts, painted_slogan,
                       painted_words, paraphrases, product_listing, relation_clause, with_article)
from .scenes import COLOURS, COUNT_WORDS, RELATIONS, SHAPES, Scene, description, relayout, render, sample_scene
from .shards import encode_jpg, read_samples, shard_paths, write_shard

NOISE_KINDS = ("clean", "junk", "text_in_image", "mismatched")

CLASSIFICATION_TASKS = {
    "synthetic_shape": {
        "classnames": list(SHAPES),
        "templates": ["a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "a {c} shape."],
    },
    "synthetic_colour": {
        "classnames": list(COLOURS),
        "templates": ["a photo of a {c} shape.", "a {c} shape.", "something {c}.", "a drawing of a {c} object."],
    },
    "synthetic_count": {
        "classnames": ["one shape", "two shapes", "three shapes"],
        "templates": ["a photo of {c}.", "{c}.", "a picture of {c}.", "a drawing of {c}."],
    },
}


def rng_for(seed: int, name: str) -> np.random.Generator:
    """An independent, stable generator per (seed, split name)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _exact_kinds(shares: dict[str, float], n: int, rng, rest: str) -> list[str]:
    """round(share * n) of each kind, `rest` for the remainder, in shuffled order."""
    kinds = [k for k, f in shares.items() for _ in range(int(round(f * n)))][:n]
    kinds += [rest] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def _noise_kinds(d: DownloadParams, rng) -> list[str]:
    """Exactly the configured fraction of each kind, in shuffled order (all clean when the world has no
    uninformative pairs)."""
    if not d.world.uninformative:
        return ["clean"] * d.num_train
    return _exact_kinds(d.noise.model_dump(), d.num_train, rng, "clean")


def _junk_kinds(w: WorldParams, n: int, rng) -> list[str]:
    """The kind of each of n junk captions: junk_mix's shares (largest first takes the remainder), or templates."""
    if w.junk_style == "templates":
        return ["template"] * n
    mix = w.junk_mix.model_dump()
    rest = max(mix, key=mix.get)
    return _exact_kinds({k: f for k, f in mix.items() if k != rest}, n, rng, rest)


def _same_scene_sources(kinds: list[str], rate: float, rng) -> dict[int, int]:
    """{copy index: source index}: round(rate * n) clean pairs (at most all clean pairs but the first) re-render the
    scene of an earlier clean pair, drawn uniformly (a copy can be copied again: popular scenes recur, as re-uploads
    on the web)."""
    clean = [i for i, k in enumerate(kinds) if k == "clean"]
    m = min(int(round(rate * len(kinds))), max(0, len(clean) - 1))
    copies = set(rng.choice(clean[1:], size=m, replace=False).tolist()) if m else set()
    out, earlier = {}, []
    for i in clean:
        if i in copies:
            out[i] = int(earlier[int(rng.integers(len(earlier)))])
        earlier.append(i)
    return out


def sample_rngs(seed: int, i: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(scene and pixels, captions) generators of training pair i: a caption knob leaves the images alone."""
    return (np.random.default_rng([seed, zlib.crc32(b"train/scene"), i]),
            np.random.default_rng([seed, zlib.crc32(b"train/caption"), i]))


def _captions(kind: str, junk_kind: str | None, scene: Scene, d: DownloadParams, rng) -> list[str]:
    """The captions of a training pair of this noise kind (junk: of this junk kind; painted text set on scene)."""
    w = d.world
    caps = [caption(scene, rng, w.omit_prob, w.diverse_captions)]
    if kind == "clean" and rng.random() < d.multi_caption:
        caps = paraphrases(scene, rng, int(rng.integers(2, d.max_captions + 1)), w.omit_prob, w.diverse_captions)
    if kind == "mismatched":
        caps = [caption(sample_scene(rng), rng, w.omit_prob, w.diverse_captions)]
    elif kind == "text_in_image":
        scene.painted_text = painted_words(scene, rng)
    elif junk_kind == "template":
        caps = [junk_caption(rng)]
    elif junk_kind == "noun_phrase":
        caps = [junk_noun_phrase(scene, rng)]
    elif junk_kind == "product_listing":
        caps = [product_listing(scene, rng)]
    elif junk_kind == "painted_text_only":
        scene.painted_text = painted_slogan(rng)
        caps = [scene.painted_text]
    return caps


def train_samples(d: DownloadParams, seed: int):
    """Yield training samples (dicts ready for a TarWriter), deterministic from the seed.

    Training pairs carry planted noise of known kinds (recorded in each sample's json):
    ``clean``, ``junk`` (a caption that says little of the image, of ``junk_kind`` noun_phrase, product_listing,
    painted_text_only or template), ``text_in_image`` (caption words painted into the image) and ``mismatched``
    (another image's caption). A share of clean pairs carries several paraphrased captions (``captions``, for FFF).
    The world's premises (``d.world``) are planted with their truth: ``scene_id`` (the index of the first image of
    the same scene description, ``scenes.description``: equal for every two images a caption cannot tell apart,
    re-rendered or drawn alike by chance), ``copy_of`` (a re-render: the index of the pair whose description and
    captions it shares; null otherwise), ``omitted`` (the concepts shown that no caption names).
    """
    w = d.world
    kinds = _noise_kinds(d, rng_for(seed, "train"))
    junk = iter(_junk_kinds(w, kinds.count("junk"), rng_for(seed, "train/junk_kinds")))
    copies = _same_scene_sources(kinds, w.same_scene_rate, rng_for(seed, "train/same_scene"))
    described: dict[int, tuple[Scene, list[str]]] = {}  # clean pair -> (scene, captions)
    first_of: dict[tuple, int] = {}  # scene description -> the index of its first image
    for i, kind in enumerate(kinds):
        rs, rc = sample_rngs(seed, i)
        junk_kind = next(junk) if kind == "junk" else None
        if i in copies:
            source, caps = described[copies[i]]
            scene = relayout(source, rs) or Scene(source.shapes, source.relation)  # None: practically unreachable
        else:
            scene = sample_scene(rs)
            caps = _captions(kind, junk_kind, scene, d, rc)
        scene_id = first_of.setdefault(description(scene), i)
        if kind == "clean":
            described[i] = (scene, caps)
        img = render(scene, d.image_size, rs)
        key = f"{i:09d}"
        meta = {"key": key, "caption": caps[0], "captions": caps, "noise": kind, "junk_kind": junk_kind,
                "multi_caption": len(caps) > 1, "scene_id": scene_id, "copy_of": copies.get(i), "omitted": omitted_concepts(scene, caps),
                "status": "success", "width": d.image_size, "height": d.image_size, **scene.to_json()}
        yield {"__key__": key, "jpg": encode_jpg(img), "txt": caps[0], "json": json.dumps(meta).encode()}


def teacher_labels(scene: Scene) -> dict:
    """Multi-label ground truth used to pre-train the stand-in teacher."""
    return {
        "shapes": sorted({s.shape for s in scene.shapes}),
        "colours": sorted({s.colour for s in scene.shapes}),
        "sizes": sorted({s.size for s in scene.shapes}),
        "relation": scene.relation["type"] if scene.relation else None,
        "count": scene.count,
    }


def teacher_samples(d: DownloadParams, seed: int):
    """Clean, labelled scenes disjoint from the training pairs (the SWAG stand-in's data). A share
    ``world.teacher_label_noise`` of them carries the labels of another, random scene (``label_noise``: true,
    ``true_labels``): a weaker teacher."""
    rng = rng_for(seed, "teacher")
    noise_rng = rng_for(seed, "teacher/label_noise")
    noisy = _exact_kinds({"noisy": d.world.teacher_label_noise}, d.teacher_samples, noise_rng, "true")
    for i in range(d.teacher_samples):
        scene = sample_scene(rng)
        img = render(scene, d.image_size, rng)
        key = f"t{i:08d}"
        meta = {"key": key, **scene.to_json(), "labels": teacher_labels(scene), "label_noise": noisy[i] == "noisy"}
        if meta["label_noise"]:
            meta["true_labels"], meta["labels"] = meta["labels"], teacher_labels(sample_scene(noise_rng))
        yield {"__key__": key, "jpg": encode_jpg(img), "json": json.dumps(meta).encode()}


def _classification_split(task: str, n_per_class: int, d: DownloadParams, seed: int, split: str):
    rng = rng_for(seed, f"{task}/{split}")
    classnames = CLASSIFICATION_TASKS[task]["classnames"]
    order = [c for c in range(len(classnames)) for _ in range(n_per_class)]
    rng.shuffle(order)
    for i, cls in enumerate(order):
        if task == "synthetic_count":
            scene = sample_scene(rng, count=cls + 1)
        else:
            scene = sample_scene(rng, count=1)
            s = scene.shapes[0]
            if task == "synthetic_shape":
                s.shape = SHAPES[cls]
            else:
                s.colour = list(COLOURS)[cls]
        img = render(scene, d.image_size, rng)
        yield {"__key__": f"{i:08d}", "jpg": encode_jpg(img), "cls": str(cls).encode(),
               "json": json.dumps(scene.to_json()).encode()}


def _retrieval_split(d: DownloadParams, seed: int):
    rng = rng_for(seed, "synthetic_retrieval/test")
    for i in range(d.eval.retrieval_images):
        scene = sample_scene(rng)
        caps = paraphrases(scene, rng, 2)
        img = render(scene, d.image_size, rng)
        yield {"__key__": f"{i:08d}", "jpg": encode_jpg(img), "txt": "\n".join(caps),
               "json": json.dumps(scene.to_json()).encode()}


def vqa_question(scene: Scene, rng) -> dict:
    """A question with candidate answers and one declarative statement per answer."""
    qtype = "relation" if scene.relation else str(rng.choice(["colour", "shape"]))
    if rng.random() < 0.25:
        qtype = "count"
    if qtype in ("colour", "shape"):
        s = scene.shapes[0]
        if qtype == "colour":
            question, answers, truth = f"what colour is the {s.shape}?", list(COLOURS), s.colour
            statements = [with_article(f"{c} {s.shape}") for c in answers]
        else:
            question, answers, truth = f"what shape is the {s.colour} object?", list(SHAPES), s.shape
            statements = [with_article(f"{s.colour} {a}") for a in answers]
        return {"qtype": qtype, "question": question, "answers": answers, "statements": statements,
                "label": answers.index(truth)}
    if qtype == "count":
        answers = [COUNT_WORDS[k] for k in (1, 2, 3)]
        statements = [f"{w} shape" if w == "one" else f"{w} shapes" for w in answers]
        return {"qtype": qtype, "question": "how many shapes are there?", "answers": answers,
                "statements": statements, "label": scene.count - 1}
    rel = scene.relation
    a, b = scene.shapes[rel["subject"]], scene.shapes[rel["object"]]
    answers = list(RELATIONS)
    statements = [f"{with_article(a.colour)} {a.shape} {v} {with_article(b.colour)} {b.shape}" for v in answers]
    return {"qtype": "relation", "question": f"what is the {a.colour} {a.shape} doing to the {b.colour} {b.shape}?",
            "answers": answers, "statements": statements, "label": answers.index(rel["type"])}


def _vqa_split(d: DownloadParams, seed: int):
    rng = rng_for(seed, "synthetic_vqa/test")
    for i in range(d.eval.vqa_questions):
        scene = sample_scene(rng)
        q = vqa_question(scene, rng)
        img = render(scene, d.image_size, rng)
        yield {"__key__": f"{i:08d}", "jpg": encode_jpg(img), "json": json.dumps({**q, **scene.to_json()}).encode()}


COMPOSITIONAL_QUESTION = "which caption describes the image?"


def compositional_item(rng: np.random.Generator) -> tuple[Scene, dict]:
    """A two-shape scene and a 2-way choice (ARO / Winoground style): its true caption, and the same words with the
    roles (subject and object) or the colours of the two shapes swapped. A touch is symmetric, so only its colours
    are swapped, between two different shapes."""
    while True:
        scene = sample_scene(rng, count=2)
        a, b = scene.shapes  # subject, object
        rel = scene.relation["type"]
        swap = "colour" if rel == "touches" else str(rng.choice(["role", "colour"]))
        if not (rel == "touches" and a.shape == b.shape):
            break
    form = int(rng.integers(len(VERB_FORMS[rel])))
    true = relation_clause(with_article(f"{a.colour} {a.shape}"), rel, with_article(f"{b.colour} {b.shape}"), form)
    if swap == "role":
        wrong = relation_clause(with_article(f"{b.colour} {b.shape}"), rel, with_article(f"{a.colour} {a.shape}"), form)
    else:
        wrong = relation_clause(with_article(f"{b.colour} {a.shape}"), rel, with_article(f"{a.colour} {b.shape}"), form)
    label = int(rng.integers(2))
    statements = [wrong, true] if label else [true, wrong]
    return scene, {"qtype": f"{swap}_swap", "question": COMPOSITIONAL_QUESTION, "answers": statements,
                   "statements": statements, "label": label}


def _compositional_split(d: DownloadParams, seed: int):
    rng = rng_for(seed, "synthetic_compositional/test")
    for i in range(d.eval.compositional_items):
        scene, q = compositional_item(rng)
        img = render(scene, d.image_size, rng)
        yield {"__key__": f"{i:08d}", "jpg": encode_jpg(img), "json": json.dumps({**q, **scene.to_json()}).encode()}


def _write_split(samples, directory: Path, shard_size: int, desc: str, total: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    buf, shard, n = [], 0, 0
    bar = dict(total=total, desc=f"download: {desc} samples", unit="sample", leave=False, mininterval=1.0)
    for s in tqdm(samples, **bar):
        buf.append(s)
        n += 1
        if len(buf) == shard_size:
            write_shard(directory / f"{shard}.tar", buf)
            buf, shard = [], shard + 1
    if buf:
        write_shard(directory / f"{shard}.tar", buf)
        shard += 1
    atomic_write_text(directory / "nshards.txt", f"{shard}\n")
    return n


def write_eval_splits(d: DownloadParams, seed: int, root: Path) -> dict[str, int]:
    """Write the clean evaluation tasks in CLIP_benchmark's wds layout.

    ``<root>/<task>/<split>/{0..n-1}.tar`` + ``nshards.txt``, ``classnames.txt``,
    ``zeroshot_classification_templates.txt``.
    """
    e = d.eval
    counts = {}
    for task, spec in CLASSIFICATION_TASKS.items():
        base = root / task
        base.mkdir(parents=True, exist_ok=True)
        atomic_write_text(base / "classnames.txt", "\n".join(spec["classnames"]) + "\n")
        atomic_write_text(base / "zeroshot_classification_templates.txt", "\n".join(spec["templates"]) + "\n")
        k = len(spec["classnames"])
        for split, per in (("test", e.per_class), ("val", max(2, e.per_class // 2)),
                           ("train", e.fewshot_per_class)):
            counts[f"{task}/{split}"] = _write_split(
                _classification_split(task, per, d, seed, split), base / split, 10_000, f"{task}/{split}", per * k)
    counts["synthetic_retrieval/test"] = _write_split(
        _retrieval_split(d, seed), root / "synthetic_retrieval" / "test", 10_000, "retrieval", e.retrieval_images)
    counts["synthetic_vqa/test"] = _write_split(
        _vqa_split(d, seed), root / "synthetic_vqa" / "test", 10_000, "vqa", e.vqa_questions)
    counts["synthetic_compositional/test"] = _write_split(
        _compositional_split(d, seed), root / "synthetic_compositional" / "test", 10_000, "compositional",
        e.compositional_items)
    return counts


def generate(d: DownloadParams, seed: int, root: str | Path, train: bool = True) -> dict:
    """Materialise the whole synthetic source under root: raw/train, raw/teacher, eval/<task>/<split>.

    train=False leaves raw/train alone (it comes from a URL list)."""
    root = Path(root)
    stats = {}
    if train:
        stats["train"] = _write_split(train_samples(d, seed), root / "raw" / "train", d.shard_size, "train",
                                      d.num_train)
    stats["teacher"] = _write_split(teacher_samples(d, seed), root / "raw" / "teacher", d.shard_size, "teacher",
                                    d.teacher_samples)
    stats.update(write_eval_splits(d, seed, root / "eval"))
    return stats


def train_metas(train_dir: Path) -> list[dict]:
    """The json of every sample of the written train shards."""
    return [s["json"] for shard in shard_paths(train_dir) for s in read_samples(shard)]


def planted_noise(train_dir: Path, n: int) -> tuple[dict[str, float], float]:
    """(fraction of each noise kind, fraction of multi-caption pairs) read back from the written train shards."""
    return noise_summary(train_metas(train_dir), n)


def noise_summary(metas: list[dict], n: int) -> tuple[dict[str, float], float]:
    """(fraction of each noise kind, fraction of multi-caption pairs) of the training samples' json."""
    kinds = Counter(m["noise"] for m in metas)
    return {k: kinds[k] / n for k in NOISE_KINDS}, sum(bool(m["multi_caption"]) for m in metas) / n


def planted_world(metas: list[dict]) -> dict:
    """The world's planted truth read back from the training samples' json: the junk kinds' shares of the junk,
    the share of re-rendered scenes and of pairs in a same-scene group (re-renders and descriptions drawn alike), the omitted concepts of the pairs whose
    captions describe their own image (clean, text_in_image), and how often distinct scenes share a caption."""
    junk = Counter(m["junk_kind"] for m in metas if m["noise"] == "junk")
    groups = Counter(m["scene_id"] for m in metas)
    own = [m for m in metas if m["noise"] in ("clean", "text_in_image")]
    scenes_of: dict[str, set] = {}
    for m in metas:
        if m["noise"] == "clean":
            scenes_of.setdefault(m["caption"], set()).add(m["scene_id"])
    clean = [m for m in metas if m["noise"] == "clean"]
    return {
        "junk_kind_fraction": {k: v / max(1, sum(junk.values())) for k, v in sorted(junk.items())},
        "same_scene_copies": sum(m.get("copy_of") is not None for m in metas) / max(1, len(metas)),
        "in_same_scene_group": sum(groups[m["scene_id"]] > 1 for m in metas) / max(1, len(metas)),
        "omitted_any": sum(bool(m["omitted"]) for m in own) / max(1, len(own)),
        "omitted_per_pair": sum(len(m["omitted"]) for m in own) / max(1, len(own)),
        "shared_caption": sum(len(scenes_of[m["caption"]]) > 1 for m in clean) / max(1, len(clean)),
    }


SYNTHETIC_EVAL_TASKS = (*CLASSIFICATION_TASKS, "synthetic_retrieval", "synthetic_vqa", "synthetic_compositional")


class SourceConflict(RuntimeError):
    """data/raw/train holds the other source's training split."""


def url_list_download_in(train_dir: Path) -> bool:
    """Whether train_dir holds a URL list's download (its _stats.json or a shard's parquet)."""
    return (train_dir / "_stats.json").exists() or any(train_dir.glob("*.parquet"))


def synthetic_train_in(train_dir: Path) -> bool:
    """Whether train_dir holds the synthetic source's training split (its nshards.txt)."""
    return (train_dir / "nshards.txt").exists()


def clear_synthetic(root: Path, train: bool) -> None:
    """Remove what generate writes, and nothing else: raw/teacher, eval/<synthetic task>, and with train the
    synthetic shards of raw/train (a URL list's download there is refused before anything is removed)."""
    train_dir = root / "raw" / "train"
    if train and url_list_download_in(train_dir):
        raise SourceConflict(
            f"download.source synthetic: {train_dir} holds a URL list's download (_stats.json, *.parquet); the "
            f"synthetic training split would replace it. Move it away (or delete it) first, or give this run its "
            f"own paths.data")
    shutil.rmtree(root / "raw" / "teacher", ignore_errors=True)
    for task in SYNTHETIC_EVAL_TASKS:  # stale shards of a bigger config must not survive
        shutil.rmtree(root / "eval" / task, ignore_errors=True)
    if train and train_dir.is_dir():
        for f in train_dir.iterdir():
            if f.name == "nshards.txt" or (f.suffix == ".tar" and f.stem.isdigit()) or f.name.endswith(".tmp"):
                f.unlink()


def write_source(d: DownloadParams, seed: int, root: str | Path) -> dict:
    """Write a fresh synthetic source over the old one (clear_synthetic: SourceConflict where data/raw/train
    holds a URL list's download); its summary (the download stage's metrics)."""
    root = Path(root)
    clear_synthetic(root, train=True)
    counts = generate(d, seed, root)
    n = counts["train"]
    metas = train_metas(root / "raw" / "train")
    noise, multi = noise_summary(metas, n)
    return {
        "world": planted_world(metas),
        "train_samples": n,
        "train_shards": len(shard_paths(root / "raw" / "train")),
        "teacher_samples": counts["teacher"],
        "noise_fraction": noise,
        "multi_caption_fraction": multi,
        "eval_samples": eval_counts(counts),
    }


def eval_counts(counts: dict) -> dict[str, int]:
    """The evaluation splits' sample counts out of generate's stats."""
    return {k: v for k, v in counts.items() if "/" in k}
