"""The built-in synthetic image-caption dataset, deterministic from a seed."""

from __future__ import annotations

import json
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DownloadParams
from .files import atomic_write_text
from .captions import with_article, caption, junk_caption, painted_words, paraphrases
from .scenes import COLOURS, COUNT_WORDS, RELATIONS, SHAPES, Scene, render, sample_scene
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


def _noise_kinds(d: DownloadParams, rng) -> list[str]:
    """Exactly the configured fraction of each kind, in shuffled order."""
    n = d.num_train
    counts = {k: int(round(getattr(d.noise, k) * n)) for k in ("junk", "text_in_image", "mismatched")}
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds += ["clean"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def train_samples(d: DownloadParams, seed: int):
    """Yield training samples (dicts ready for a TarWriter), deterministic from the seed.

    Training pairs carry planted noise of known kinds (recorded in each sample's json):
    ``clean``, ``junk`` (boilerplate caption, no action), ``text_in_image`` (caption words
    painted into the image) and ``mismatched`` (another image's caption). A share of clean
    pairs carries several paraphrased captions (``captions`` in the json, for FFF).
    """
    rng = rng_for(seed, "train")
    kinds = _noise_kinds(d, rng)
    for i, kind in enumerate(kinds):
        scene = sample_scene(rng)
        caps = [caption(scene, rng)]
        if kind == "clean" and rng.random() < d.multi_caption:
            caps = paraphrases(scene, rng, int(rng.integers(2, d.max_captions + 1)))
        if kind == "junk":
            caps = [junk_caption(rng)]
        elif kind == "mismatched":
            caps = [caption(sample_scene(rng), rng)]
        elif kind == "text_in_image":
            scene.painted_text = painted_words(scene, rng)
        img = render(scene, d.image_size, rng)
        key = f"{i:09d}"
        meta = {"key": key, "caption": caps[0], "captions": caps, "noise": kind,
                "multi_caption": len(caps) > 1, "status": "success",
                "width": d.image_size, "height": d.image_size, **scene.to_json()}
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
    """Clean, labelled scenes disjoint from the training pairs (the SWAG stand-in's data)."""
    rng = rng_for(seed, "teacher")
    for i in range(d.teacher_samples):
        scene = sample_scene(rng)
        img = render(scene, d.image_size, rng)
        key = f"t{i:08d}"
        meta = {"key": key, **scene.to_json(), "labels": teacher_labels(scene)}
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


def planted_noise(train_dir: Path, n: int) -> tuple[dict[str, float], float]:
    """(fraction of each noise kind, fraction of multi-caption pairs) read back from the written train shards."""
    kinds, multi = Counter(), 0
    for shard in shard_paths(train_dir):
        for s in read_samples(shard):
            kinds[s["json"]["noise"]] += 1
            multi += bool(s["json"]["multi_caption"])
    return {k: kinds[k] / n for k in NOISE_KINDS}, multi / n


SYNTHETIC_EVAL_TASKS = (*CLASSIFICATION_TASKS, "synthetic_retrieval", "synthetic_vqa")


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
    noise, multi = planted_noise(root / "raw" / "train", n)
    return {
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
