"""Loaders for the real evaluation datasets, in one uniform in-memory form."""

from __future__ import annotations

from abc import abstractmethod

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from .images import load_split
from .shards import (BAD_LABEL, Faults, SampleFault, as_integer, check_image, decode_image, image_ext, iter_shard,
                     no_sample_left, parse_sample, pixel_limit, sample_captions, shard_paths, skip_or_fail)

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
    A bad sample (data/shards.py FAULTS, or BAD_LABEL) or a truncated shard is skipped and counted in the loader's
    ``faults`` (its images checked at index time, as data/shards.py check_image does, so that every image kept
    decodes later); without ``faults`` it is a ValueError naming shard (or folder), key and reason.
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


def _wds_samples(shards: list[Path], max_pixels: int | None, **need) -> Iterator[dict]:
    """Every sample of the shards, parsed (data/shards.py parse_sample; its image checked, not kept) with ``image``:
    (shard, data offset, size) of its image member when it has one; truncation records included."""
    limit = pixel_limit(max_pixels)
    for shard in shards:
        for raw in iter_shard(shard, offsets=True):
            s = parse_sample(raw, limit, check_only=True, **need)
            if image_ext(raw) is not None:
                s["image"] = (shard, *raw["__offsets__"][image_ext(raw)])
            yield s


def _good_samples(shards: list[Path], max_pixels: int | None, faults: Faults | None, **need) -> Iterator[dict]:
    """The samples of the shards without a fault (``_wds_samples``); the others counted in ``faults`` or failed."""
    for s in _wds_samples(shards, max_pixels, **need):
        if not skip_or_fail(s, faults):
            yield s


def _fault(s: dict, reason: str, error: str) -> dict:
    """The sample with a fault found by its loader."""
    return {**s, "fault": reason, "error": error}


def _file_sample(path: Path, max_pixels: int | None) -> dict:
    """One image file as a parsed sample (key: its name, shard: its folder), its image checked (check_image): fault
    None, bad_image (unreadable, missing or undecodable) or too_many_pixels."""
    s = {"key": path.name, "shard": str(path.parent), "fault": None}
    try:
        check_image(path.read_bytes(), pixel_limit(max_pixels))
    except OSError as err:
        return _fault(s, "bad_image", f"{type(err).__name__}: {err}")
    except SampleFault as err:
        return _fault(s, err.reason, err.message)
    return s


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


def load_wds_classification(root: str | Path, split: str = "test", max_pixels: int | None = None,
                            faults: Faults | None = None) -> dict:
    """A CLIP_benchmark wds classification split: images, labels, classnames, templates.

    Layout (CLIP_benchmark ``wds/``): ``<root>/<split>/{0..n-1}.tar`` + ``<root>/<split>/nshards.txt``,
    ``<root>/classnames.txt``, ``<root>/zeroshot_classification_templates.txt``; a sample holds an image
    (``webp``/``png``/``jpg``) and ``cls``. A cls that is missing, no integer or outside the classes is BAD_LABEL.
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
    for s in _good_samples(shards, max_pixels, faults, need_label=True):
        if not 0 <= s["cls"] < len(classnames) and skip_or_fail(
                _fault(s, BAD_LABEL, f"label {s['cls']} outside the {len(classnames)} classes of {cn_file}"), faults):
            continue
        entries.append(s["image"])
        labels.append(s["cls"])
        keys.append(s["key"])
    no_sample_left(entries, root / split, faults)
    return {"images": TarImages(entries), "labels": torch.tensor(labels, dtype=torch.long), "classnames": classnames,
            "templates": templates, "keys": keys}


def load_wds_retrieval(root: str | Path, split: str = "test", max_pixels: int | None = None,
                       faults: Faults | None = None) -> dict:
    """A CLIP_benchmark wds retrieval split: images, captions (txt, one per line), text_to_image.

    Layout: ``<root>/<split>/{0..n-1}.tar`` + ``<root>/<split>/nshards.txt``; a sample holds an image
    (``webp``/``png``/``jpg``) and ``txt`` with one caption per line (or a json "captions" list). A sample dropped
    for a fault takes its captions with it.
    """
    root = Path(root)
    shards = wds_shards(root, split, WDS_RETRIEVAL_LAYOUT)
    entries, captions, t2i, keys = [], [], [], []
    for s in _good_samples(shards, max_pixels, faults, need_caption=True):
        lines = [line.strip() for c in s["captions"] for line in c.splitlines() if line.strip()]
        captions.extend(lines)
        t2i.extend([len(entries)] * len(lines))
        entries.append(s["image"])
        keys.append(s["key"])
    no_sample_left(entries, root / split, faults)
    return {"images": TarImages(entries), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "keys": keys}


def load_wds_vqa(root: str | Path, split: str = "test", max_pixels: int | None = None,
                 faults: Faults | None = None) -> dict:
    """Zero-shot VQA as answer selection, wds layout like synthetic_vqa.

    Each sample: an image and a ``json`` with ``question``, ``answers`` (candidates), ``label``
    (index of the correct candidate) and optionally ``statements`` (one per candidate; else
    rendered with ``VQA_STATEMENT_TEMPLATE``) and ``qtype``. A json without these is ``bad_json``, a label
    outside the answers BAD_LABEL.
    """
    root = Path(root)
    shards = wds_shards(root, split, WDS_VQA_LAYOUT)
    out = {"questions": [], "answers": [], "statements": [], "labels": [], "qtypes": [], "keys": []}
    entries = []
    for s in _good_samples(shards, max_pixels, faults):
        try:
            q = _vqa_question(s.get("json"))
        except SampleFault as err:
            skip_or_fail(_fault(s, err.reason, err.message), faults)
            continue
        entries.append(s["image"])
        for field, value in q.items():
            out[field].append(value)
        out["keys"].append(s["key"])
    no_sample_left(entries, root / split, faults)
    out["labels"] = torch.tensor(out["labels"], dtype=torch.long)
    return {"images": TarImages(entries), **out}


def _vqa_question(q: dict | None) -> dict:
    """One VQA sample's entry of each of questions, answers, statements (one per answer), labels and qtypes, from its
    json; SampleFault ("bad_json" | BAD_LABEL) when they are missing or do not fit together."""
    if q is None:
        raise SampleFault("bad_json", "no json member (question, answers, label)")
    answers, question = q.get("answers"), q.get("question", "")
    if not (isinstance(answers, list) and answers):
        raise SampleFault("bad_json", "json needs a non-empty list of answers")
    label = as_integer(q.get("label"))
    if label is None or not 0 <= label < len(answers):
        raise SampleFault(BAD_LABEL, f"label {q.get('label')!r} is no index into its {len(answers)} answers")
    statements = q.get("statements") or [VQA_STATEMENT_TEMPLATE.format(question=question, answer=a) for a in answers]
    if not (isinstance(statements, list) and len(statements) == len(answers)
            and all(isinstance(st, str) for st in statements)):
        raise SampleFault("bad_json", f"json statements are not {len(answers)} strings, one per answer")
    return {"questions": question, "answers": answers, "statements": list(statements), "labels": label,
            "qtypes": str(q.get("qtype", "all"))}


def load_imagefolder(root: str | Path, classnames: list[str] | None = None, templates: list[str] | None = None,
                     max_pixels: int | None = None, faults: Faults | None = None) -> dict:
    """torchvision ImageFolder (<root>/<class>/*.jpg): classes are the sorted folder names; an image file that does
    not decode (bad_image) or is too large (too_many_pixels) is skipped and counted."""
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
    files = [(label, f) for label, d in enumerate(folders)
             for f in sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_FILE_SUFFIXES)]
    if not files:
        raise DatasetNotFound(f"no images ({', '.join(IMG_FILE_SUFFIXES)}) in the class folders of {root}; "
                              f"expected {layout}")
    paths, labels = [], []
    for label, f in files:
        if not skip_or_fail(_file_sample(f, max_pixels), faults):
            paths.append(f)
            labels.append(label)
    no_sample_left(paths, root, faults)
    return {"images": FileImages(paths), "labels": torch.tensor(labels, dtype=torch.long),
            "classnames": list(classnames), "templates": list(templates or DEFAULT_TEMPLATES)}


def load_karpathy_json(json_path: str | Path, image_root: str | Path, max_pixels: int | None = None,
                       faults: Faults | None = None) -> dict:
    """ALBEF-style retrieval test json (a list of {"image": relative path, "caption": [..]}).

    The Karpathy-split files ``coco_test.json``, ``flickr30k_test.json``; paths are relative to ``image_root``.
    An entry that is not such an object (bad_json), without a caption (missing_caption, empty_caption) or whose image
    is missing or bad (bad_image, too_many_pixels) is skipped with its captions and counted; DatasetNotFound when
    no named image is there at all.
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
    paths, captions, t2i, missing = [], [], [], []
    for i, item in enumerate(items):
        s = _karpathy_entry(item, image_root, max_pixels, {"key": f"entry {i}", "shard": str(json_path)})
        if s["fault"] == "bad_image" and not (image_root / s["key"]).is_file():
            missing.append(image_root / s["key"])
        if skip_or_fail(s, faults):
            continue
        captions.extend(s["captions"])
        t2i.extend([len(paths)] * len(s["captions"]))
        paths.append(image_root / s["key"])
    if not paths and missing:
        raise DatasetNotFound(f"none of the {len(missing)} images named by {json_path} is under {image_root} "
                              f"(e.g. {missing[0]})")
    no_sample_left(paths, json_path, faults)
    return {"images": FileImages(paths), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "image_paths": paths}


def _karpathy_entry(item, image_root: Path, max_pixels: int | None, where: dict) -> dict:
    """An entry of a Karpathy json as a parsed sample (key: its image path; captions stripped), checked in
    parse_sample's order: the entry, its captions, its image (``_file_sample``)."""
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        return _fault({**where, "fault": None}, "bad_json", f"not an object with an 'image' path: {item!r:.200}")
    s = {"key": item["image"], "shard": where["shard"], "fault": None}
    caption = item.get("caption")
    captions = [caption] if isinstance(caption, str) else caption
    try:
        s["captions"] = [c.strip() for c in sample_captions({"json": {"captions": captions}})]
    except SampleFault as err:
        return _fault(s, err.reason, err.message)
    image = _file_sample(image_root / item["image"], max_pixels)
    return _fault(s, image["fault"], image["error"]) if image["fault"] else s


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


def _cc_images(shards: list[Path], max_pixels: int | None, faults: Faults | None) -> tuple[dict, dict]:
    """(url -> image of its first good sample, url -> fault of its first bad sample) of downloaded img2dataset shards.

    A record of a failed download (json status other than success) is no sample: its URL stays dead. A sample with
    a fault, or whose json names no url, is counted in ``faults``."""
    by_url, bad_url = {}, {}
    for s in _wds_samples(shards, max_pixels):
        meta = s.get("json") or {}
        if s["fault"] != "bad_json" and meta.get("status", "success") != "success":
            continue
        url = str(meta.get("url") or "").strip()
        if s["fault"] is None and not url:
            s = _fault(s, "bad_json", "no json url to join the TSV rows on")
        if skip_or_fail(s, faults):
            if url:
                bad_url.setdefault(url, s["fault"])
            continue
        by_url.setdefault(url, s["image"])
    return by_url, bad_url


def load_cc_validation(tsv_path: str | Path, shard_dir: str | Path, rows: int, block_size: int,
                       max_pixels: int | None = None, faults: Faults | None = None) -> dict:
    """Conceptual Captions validation as the DiHT GCC study evaluates it: the first ``rows`` rows of the TSV in blocks
    of ``block_size`` rows (block b: rows b*block_size .. (b+1)*block_size - 1), each block its own gallery.

    The TSV is ``caption<TAB>url``, no header; the downloaded img2dataset shards' per-sample ``json`` holds the
    ``url``. A row whose image is absent is *dead*: dropped inside its block and counted there. When the shards'
    parquets are there, a row the download never tried is ``not_downloaded`` instead. A block is ``full`` when the
    file has all its rows, the download tried all of them and at least one image is present; any other block is
    partial (reported apart, never averaged as a full one). A URL listed twice in a block: one image, two captions.
    A downloaded sample with a fault is skipped and counted in ``faults``; the rows of its URL (when its json names
    one) are dead rows of their blocks, also counted by reason in the block's ``dead_by_reason``.

    Returns images (block after block), captions, text_to_image, urls, ``blocks`` (per block: block, first_row,
    rows_in_file, images [start, end) into images, captions, dead, not_downloaded, full and, when some of its dead
    rows are bad samples, dead_by_reason), ``missing`` (dead rows) and ``total`` (rows read).
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
    by_url, bad_url = _cc_images(shards, max_pixels, faults)
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
                if url in bad_url:
                    reasons = block.setdefault("dead_by_reason", {})
                    reasons[bad_url[url]] = reasons.get(bad_url[url], 0) + 1
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
    if not entries and not bad_url:
        raise DatasetNotFound(f"none of the first {len(table)} URLs of {tsv_path} has a downloaded image in "
                              f"{shard_dir}")
    no_sample_left(entries, f"the first {len(table)} rows of {tsv_path}", faults)
    return {"images": TarImages(entries), "captions": captions,
            "text_to_image": torch.tensor(t2i, dtype=torch.long), "urls": urls, "blocks": blocks,
            "missing": sum(b["dead"] for b in blocks), "total": len(table)}


def load_synthetic(root: str | Path, kind: str, image_size: int, split: str = "test",
                   max_pixels: int | None = None, faults: Faults | None = None) -> dict:
    """A split of a synthetic task in the loaders' form; images: uint8 [N, 3, image_size, image_size].

    The tasks of ``diht_core.data.synthetic`` use the wds layout; the split is read whole, with the images
    decoded up front at the model's image size.

    VQA adds ``answers`` (the candidates of each question). Captions are the ``txt`` lines as written.
    A bad sample (see data/shards.py FAULTS; max_pixels checked in the header; classification: BAD_LABEL) or a
    truncated shard is skipped and counted in ``faults``; without ``faults`` it is an error naming shard and key.
    """
    root = Path(root)
    data = load_split(root / split, image_size, max_pixels, faults, need_label=kind == "classification")
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
