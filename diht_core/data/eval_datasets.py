"""Loaders for the real evaluation datasets, in one uniform in-memory form."""

from __future__ import annotations

from abc import abstractmethod

import json
import re
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from .shards import Faults, decode_image, load_split, shard_paths

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
IMG_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")

# The 7 prompts the CLIP authors selected for ImageNet (OpenAI's prompt-engineering notebook),
# used when a dataset ships no templates of its own.
DEFAULT_TEMPLATES = [
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
]

# How a VQA candidate answer becomes a statement when the data ships none.
VQA_STATEMENT_TEMPLATE = "question: {question} answer: {answer}"

WDS_LAYOUT = ("CLIP_benchmark wds layout: <root>/<split>/{0..n-1}.tar with <root>/<split>/nshards.txt, "
              "<root>/classnames.txt and <root>/zeroshot_classification_templates.txt; samples: image + cls")
WDS_RETRIEVAL_LAYOUT = ("CLIP_benchmark wds layout: <root>/<split>/{0..n-1}.tar with <root>/<split>/nshards.txt; "
                        "samples: image + txt (one caption per line)")
WDS_VQA_LAYOUT = ("wds layout: <root>/<split>/{0..n-1}.tar with <root>/<split>/nshards.txt; samples: image + "
                  "json {question, answers, label[, statements, qtype]}")


class DatasetNotFound(FileNotFoundError):
    """The data of a task is not where it is expected; the message names the path and layout.

    Every loader raises it when its data is absent; data that is present but malformed raises ``ValueError``.
    """


# --------------------------------------------------------------------------- lazy images


class LazyImages(Sequence):
    """A random-access sequence of RGB PIL images, decoded on access (``len()``, ``images[i]``, iteration)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _load(self, i: int) -> Image.Image: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return self._load(i % n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)})"


class FileImages(LazyImages):
    """Images stored as individual files."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> Image.Image:
        with open(self.paths[i], "rb") as f:
            return decode_image(f.read())


class TarImages(LazyImages):
    """Images stored as members of tar shards, read by offset (no tar re-scan per image)."""

    def __init__(self, entries: list[tuple[Path, int, int]]):
        self.entries = entries  # (tar path, data offset, size)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> Image.Image:
        path, offset, size = self.entries[i]
        return decode_image(_read_member(path, offset, size))


# --------------------------------------------------------------------------- tar shards


def _read_member(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key up to the first dot of the basename


def index_shard(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {ext: (data offset, size)} of one tar shard, in order; reads headers only."""
    path = Path(path)
    out: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                match = _KEY_EXT.match(m.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                out.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except tarfile.TarError as err:
        raise ValueError(f"unreadable tar shard {path}: {err}") from err
    return out


def _iter_samples(shards: list[Path]):
    """(shard, key, {ext: (offset, size)}) over the samples of the shards, in order."""
    for shard in shards:
        for key, members in index_shard(shard).items():
            yield shard, key, members


def _image_member(shard: Path, key: str, members: dict) -> tuple[Path, int, int]:
    for ext in IMAGE_EXTS:
        if ext in members:
            return (shard, *members[ext])
    raise ValueError(f"sample {key!r} in {shard} has no image (expected one of {', '.join(IMAGE_EXTS)}); "
                     f"it has: {', '.join(sorted(members))}")


def _member_text(shard: Path, key: str, members: dict, ext: str) -> str:
    if ext not in members:
        raise ValueError(f"sample {key!r} in {shard} has no .{ext}; it has: {', '.join(sorted(members))}")
    return _read_member(shard, *members[ext]).decode("utf-8", errors="replace")


def _numeric_first(p: Path):
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)


def wds_shards(root: str | Path, split: str, layout: str = WDS_LAYOUT) -> list[Path]:
    """The shards of a CLIP_benchmark wds split: {0..n-1}.tar per nshards.txt (else every *.tar)."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        what = "dataset directory" if not root.is_dir() else f"'{split}' split"
        raise DatasetNotFound(f"no {what} at {split_dir if root.is_dir() else root}; expected {layout}")
    nfile = split_dir / "nshards.txt"
    if nfile.exists():
        try:
            n = int(nfile.read_text().strip())
        except ValueError as err:
            raise ValueError(f"{nfile} must hold the number of shards: {err}") from err
        paths = [split_dir / f"{i}.tar" for i in range(n)]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise DatasetNotFound(f"{len(missing)} of the {n} shards listed by {nfile} are missing "
                                  f"(e.g. {split_dir / missing[0]}); expected {layout}")
    else:
        paths = sorted(split_dir.glob("*.tar"), key=_numeric_first)
    if not paths:
        raise DatasetNotFound(f"no .tar shards in {split_dir}; expected {layout}")
    return paths


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- loaders
# Every loader returns a plain dict; "images" is a LazyImages (load_synthetic: a uint8 tensor):
# - classification: {"images", "labels": LongTensor[N], "classnames": list[str], "templates": list[str]}
# - retrieval: {"images", "captions": list[str], "text_to_image": LongTensor[T]}
# - VQA: {"images", "questions", "answers", "statements", "labels": LongTensor[N], "qtypes"}
# Templates use CLIP_benchmark's {c} placeholder.


def load_wds_classification(root: str | Path, split: str = "test") -> dict:
    """A CLIP_benchmark wds classification split: images, labels, classnames, templates.

    Layout (CLIP_benchmark ``wds/``): ``<root>/<split>/{0..n-1}.tar`` + ``<root>/<split>/nshards.txt``,
    ``<root>/classnames.txt``, ``<root>/zeroshot_classification_templates.txt``; a sample holds an image
    (``webp``/``png``/``jpg``) and ``cls``.
    """
    root = Path(root)
    shards = wds_shards(root, split)
    cn_file = root / "classnames.txt"
    if not cn_file.exists():
        raise DatasetNotFound(f"no classnames.txt at {cn_file} (one class name per line); expected {WDS_LAYOUT}")
    classnames = _read_lines(cn_file)
    t_file = root / "zeroshot_classification_templates.txt"
    if t_file.exists():
        templates = _read_lines(t_file)
    else:
        warnings.warn(f"no {t_file}; using the default OpenAI-style templates", stacklevel=2)
        templates = list(DEFAULT_TEMPLATES)
    entries, labels, keys = [], [], []
    for shard, key, members in _iter_samples(shards):
        entries.append(_image_member(shard, key, members))
        text = _member_text(shard, key, members, "cls").strip()
        try:
            labels.append(int(text))
        except ValueError as err:
            raise ValueError(f"sample {key!r} in {shard}: .cls must be an integer, got {text!r}") from err
        keys.append(key)
    labels_t = torch.tensor(labels, dtype=torch.long)
    if len(labels_t) and not (0 <= int(labels_t.min()) and int(labels_t.max()) < len(classnames)):
        raise ValueError(f"labels of {root}/{split} span [{int(labels_t.min())}, {int(labels_t.max())}] "
                         f"but classnames.txt has {len(classnames)} classes")
    return {"images": TarImages(entries), "labels": labels_t, "classnames": classnames,
            "templates": templates, "keys": keys}


def load_wds_retrieval(root: str | Path, split: str = "test") -> dict:
    """A CLIP_benchmark wds retrieval split: images, captions (txt, one per line), text_to_image.

    Layout: ``<root>/<split>/{0..n-1}.tar`` + ``<root>/<split>/nshards.txt``; a sample holds an image
    (``webp``/``png``/``jpg``) and ``txt`` with one caption per line.
    """
    root = Path(root)
    shards = wds_shards(root, split, WDS_RETRIEVAL_LAYOUT)
    entries, captions, t2i, keys = [], [], [], []
    for shard, key, members in _iter_samples(shards):
        lines = [c.strip() for c in _member_text(shard, key, members, "txt").splitlines() if c.strip()]
        captions.extend(lines)
        t2i.extend([len(entries)] * len(lines))
        entries.append(_image_member(shard, key, members))
        keys.append(key)
    return {"images": TarImages(entries), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "keys": keys}


def load_wds_vqa(root: str | Path, split: str = "test") -> dict:
    """Zero-shot VQA as answer selection, wds layout like synthetic_vqa.

    Each sample: an image and a ``json`` with ``question``, ``answers`` (candidates), ``label``
    (index of the correct candidate) and optionally ``statements`` (one per candidate; else
    rendered with ``VQA_STATEMENT_TEMPLATE``) and ``qtype``.
    """
    root = Path(root)
    shards = wds_shards(root, split, WDS_VQA_LAYOUT)
    out = {"questions": [], "answers": [], "statements": [], "labels": [], "qtypes": [], "keys": []}
    entries = []
    for shard, key, members in _iter_samples(shards):
        try:
            q = json.loads(_member_text(shard, key, members, "json"))
            answers = list(q["answers"])
            label = int(q["label"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"sample {key!r} in {shard}: json needs question, answers, label ({err})") from err
        if not 0 <= label < len(answers):
            raise ValueError(f"sample {key!r} in {shard}: label {label} outside its {len(answers)} answers")
        question = q.get("question", "")
        statements = q.get("statements") or [VQA_STATEMENT_TEMPLATE.format(question=question, answer=a)
                                             for a in answers]
        if len(statements) != len(answers):
            raise ValueError(f"sample {key!r} in {shard}: {len(statements)} statements for {len(answers)} answers")
        entries.append(_image_member(shard, key, members))
        out["questions"].append(question)
        out["answers"].append(answers)
        out["statements"].append(list(statements))
        out["labels"].append(label)
        out["qtypes"].append(str(q.get("qtype", "all")))
        out["keys"].append(key)
    out["labels"] = torch.tensor(out["labels"], dtype=torch.long)
    return {"images": TarImages(entries), **out}


def load_imagefolder(root: str | Path, classnames: list[str] | None = None,
                     templates: list[str] | None = None) -> dict:
    """torchvision ImageFolder (<root>/<class>/*.jpg): classes are the sorted folder names."""
    root = Path(root)
    layout = "torchvision ImageFolder layout: <root>/<class>/*.jpg (one folder per class)"
    if not root.is_dir():
        raise DatasetNotFound(f"no dataset directory at {root}; expected {layout}")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DatasetNotFound(f"no class folders in {root}; expected {layout}")
    if classnames is None:
        classnames = [d.name.replace("_", " ") for d in folders]
    elif len(classnames) != len(folders):
        raise ValueError(f"{len(classnames)} classnames given for {len(folders)} class folders in {root}")
    paths, labels = [], []
    for label, d in enumerate(folders):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_FILE_SUFFIXES)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetNotFound(f"no images ({', '.join(IMG_FILE_SUFFIXES)}) in the class folders of {root}; "
                              f"expected {layout}")
    return {"images": FileImages(paths), "labels": torch.tensor(labels, dtype=torch.long),
            "classnames": list(classnames), "templates": list(templates or DEFAULT_TEMPLATES)}


def load_karpathy_json(json_path: str | Path, image_root: str | Path) -> dict:
    """ALBEF-style retrieval test json (a list of {"image": relative path, "caption": [..]}).

    The Karpathy-split files ``coco_test.json``, ``flickr30k_test.json``; paths are relative to ``image_root``.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    layout = ('ALBEF Karpathy-split json: a list of {"image": <path relative to image root>, '
              '"caption": [captions]}')
    if not json_path.exists():
        raise DatasetNotFound(f"no annotation file at {json_path}; expected {layout}")
    try:
        items = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{json_path} is not valid json: {err}") from err
    if not isinstance(items, list):
        raise ValueError(f"{json_path}: expected a list of entries; {layout}")
    paths, captions, t2i = [], [], []
    for i, item in enumerate(items):
        try:
            rel, caps = item["image"], item["caption"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{json_path} entry {i} lacks 'image'/'caption': {item!r:.200}") from err
        caps = [caps] if isinstance(caps, str) else list(caps)
        caps = [c.strip() for c in caps if c.strip()]
        captions.extend(caps)
        t2i.extend([len(paths)] * len(caps))
        paths.append(image_root / rel)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{len(missing)} of the {len(paths)} images named by {json_path} are missing "
                              f"under {image_root} (e.g. {missing[0]})")
    return {"images": FileImages(paths), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "image_paths": paths}


def _cc_rows(tsv_path: Path, rows: int) -> list[tuple[str, str]]:
    """(caption, url) of the first ``rows`` rows of a CC TSV (caption<TAB>url, no header), in file order."""
    out = []
    with open(tsv_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if len(out) == rows:
                break
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 2:
                raise ValueError(f"{tsv_path}:{n}: expected caption<TAB>url, got {line!r:.200}")
            out.append((parts[0].strip(), parts[1].strip()))
    return out


def _attempted_urls(shard_dir: Path) -> set[str] | None:
    """URLs the download tried (any status), from the shards' parquets (img2dataset's and ours); None without one."""
    parquets = sorted(shard_dir.glob("*.parquet"))
    if not parquets:
        return None
    return {str(u).strip() for p in parquets for u in pd.read_parquet(p, columns=["url"]).url}


def load_cc_validation(tsv_path: str | Path, shard_dir: str | Path, rows: int, block_size: int) -> dict:
    """Conceptual Captions validation as the DiHT GCC study evaluates it: the first ``rows`` rows of the TSV in blocks
    of ``block_size`` rows (block b: rows b*block_size .. (b+1)*block_size - 1), each block its own gallery.

    The TSV is ``caption<TAB>url``, no header; the downloaded img2dataset shards' per-sample ``json`` holds the
    ``url``. A row whose image is absent is *dead*: dropped inside its block and counted there. When the shards'
    parquets are there, a row the download never tried is ``not_downloaded`` instead. A block is ``full`` when the
    file has all its rows, the download tried all of them and at least one image is present; any other block is
    partial (reported apart, never averaged as a full one). A URL listed twice in a block: one image, two captions.

    Returns images (block after block), captions, text_to_image, urls, ``blocks`` (per block: block, first_row,
    rows_in_file, images [start, end) into images, captions, dead, not_downloaded, full), ``missing`` (dead
    rows) and ``total`` (rows read).
    """
    tsv_path, shard_dir = Path(tsv_path), Path(shard_dir)
    if not tsv_path.exists():
        raise DatasetNotFound(f"no Conceptual Captions validation TSV at {tsv_path} "
                              "(caption<TAB>url per line, no header)")
    table = _cc_rows(tsv_path, rows)
    shards = shard_paths(shard_dir) if shard_dir.is_dir() else []
    if not shards:
        raise DatasetNotFound(f"no downloaded webdataset shards (*.tar) in {shard_dir}; expected img2dataset "
                              "output (image + .json holding the url) for the URLs of " + str(tsv_path))
    by_url: dict[str, tuple[Path, int, int]] = {}
    for shard, key, members in _iter_samples(shards):
        if "json" not in members or not any(e in members for e in IMAGE_EXTS):
            continue
        meta = json.loads(_member_text(shard, key, members, "json"))
        if meta.get("status", "success") != "success" or not meta.get("url"):
            continue
        by_url.setdefault(str(meta["url"]).strip(), _image_member(shard, key, members))
    attempted = _attempted_urls(shard_dir)
    entries, captions, t2i, urls, blocks = [], [], [], [], []
    for b, first in enumerate(range(0, rows, block_size)):
        block_rows = table[first:first + block_size]
        block = {"block": b, "first_row": first, "rows_in_file": len(block_rows),
                 "images": (len(entries), len(entries)), "captions": 0, "dead": 0, "not_downloaded": 0}
        image_of_url: dict[str, int] = {}
        for caption, url in block_rows:
            if url not in by_url:
                block["not_downloaded" if attempted is not None and url not in attempted else "dead"] += 1
                continue
            if url not in image_of_url:
                image_of_url[url] = len(entries)
                entries.append(by_url[url])
                urls.append(url)
            captions.append(caption)
            t2i.append(image_of_url[url])
            block["captions"] += 1
        block["images"] = (block["images"][0], len(entries))
        block["full"] = (block["rows_in_file"] == block_size and block["not_downloaded"] == 0
                         and len(entries) > block["images"][0])
        blocks.append(block)
    if not entries:
        raise DatasetNotFound(f"none of the first {len(table)} URLs of {tsv_path} has a downloaded image in "
                              f"{shard_dir}")
    return {"images": TarImages(entries), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "urls": urls, "blocks": blocks,
            "missing": sum(b["dead"] for b in blocks), "total": len(table)}


def load_synthetic(root: str | Path, kind: str, image_size: int, split: str = "test",
                   max_pixels: int | None = None, faults: Faults | None = None) -> dict:
    """A split of a synthetic task in the loaders' form; images: uint8 [N, 3, image_size, image_size].

    The tasks of ``diht_core.data.synthetic`` use the wds layout; the split is read whole, with the images
    decoded up front at the model's image size.

    VQA adds ``answers`` (the candidates of each question). Captions are the ``txt`` lines as written.
    A bad sample (see data/shards.py FAULTS; max_pixels checked in the header) or a truncated shard is skipped and
    counted in ``faults``; without ``faults`` it is an error naming shard and key.
    """
    root = Path(root)
    data = load_split(root / split, image_size, max_pixels, faults)
    if kind == "classification":
        return {"images": data["images"], "labels": data["cls"], "classnames": _read_lines(root / "classnames.txt"),
                "templates": _read_lines(root / "zeroshot_classification_templates.txt")}
    if kind == "retrieval":
        captions, text_to_image = [], []
        for i, t in enumerate(data["txt"]):
            for c in t.split("\n"):
                captions.append(c)
                text_to_image.append(i)
        return {"images": data["images"], "captions": captions, "text_to_image": torch.tensor(text_to_image)}
    if kind == "vqa":
        qs = data["json"]
        return {"images": data["images"], "statements": [q["statements"] for q in qs],
                "labels": torch.tensor([q["label"] for q in qs]), "qtypes": [q["qtype"] for q in qs],
                "answers": [q["answers"] for q in qs]}
    raise ValueError(f"unknown task kind {kind!r}")
