"""The evaluation task registry: DiHT's 29-task zero-shot benchmark plus the 5 synthetic tasks.

timm-style: ``register_task`` adds a ``TaskSpec`` (directly, or as a decorator on a zero-argument
factory that returns one); ``list_tasks`` / ``get_task`` look them up. Every real task reads its
data from ``<data_root>/<default_path>`` in the layout its spec describes; ``resolve`` loads it
(or raises ``DatasetNotFound``) and ``check_available`` reports every task as ``"ok"`` or
``"skipped: <reason>"``, never silently dropping one.

The paper only names ImageNet-1K, COCO and Flickr30K among its 17 classification, 10 retrieval
and 2 VQA tasks; the rest is a reconstruction, see docs/benchmark_tasks.md.
"""

from __future__ import annotations

import difflib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .datasets import (DatasetNotFound, load_cc_validation, load_karpathy_json, load_wds_classification,
                       load_wds_retrieval, load_wds_vqa)

KINDS = ("classification", "retrieval", "vqa")
DIHT_CAPTION_TEMPLATE = "a photo of {}."  # DiHT wraps every retrieval caption (example_retrieval_eval.py)
CC_BLOCK_SIZE = 2000  # diht-gcc-evaluation-report.md: blocks of 2,000 images, each its own gallery


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task.

    loader: data_root -> the loaded data (see diht_core.eval.datasets), reading
    ``<data_root>/<default_path>``; caption_template: applied to every caption before encoding
    (retrieval; None = captions as they are); block_size: retrieval galleries of that many images
    (None = one gallery); synthetic: implemented by diht_core.benchmark.run_task.
    """

    name: str
    kind: str
    main_metric: str
    loader: Callable[[Path], dict]
    default_path: str
    layout: str
    caption_template: str | None = None
    notes: str = ""
    synthetic: bool = False
    split: str = "test"
    block_size: int | None = None

    def path(self, data_root: str | Path) -> Path:
        return Path(data_root) / self.default_path

    def wrap_captions(self, captions: list[str]) -> list[str]:
        """Captions as the model sees them (the retrieval template applied)."""
        if self.caption_template is None:
            return list(captions)
        return [self.caption_template.format(c) for c in captions]


_TASKS: dict[str, TaskSpec] = {}


def _validate(spec: TaskSpec) -> None:
    if spec.kind not in KINDS:
        raise ValueError(f"task {spec.name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
    for field in ("name", "main_metric", "default_path", "layout"):
        if not getattr(spec, field):
            raise ValueError(f"task {spec.name!r}: empty {field}")
    if not callable(spec.loader):
        raise ValueError(f"task {spec.name!r}: loader is not callable")
    if spec.kind == "retrieval" and not spec.main_metric.endswith("recall@1"):
        raise ValueError(f"task {spec.name!r}: retrieval main metric must be a recall@1, got {spec.main_metric!r}")


def register_task(spec_or_factory):
    """Register a TaskSpec, or decorate a zero-argument factory returning one (returned unchanged)."""
    spec = spec_or_factory() if callable(spec_or_factory) and not isinstance(spec_or_factory, TaskSpec) \
        else spec_or_factory
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task needs a TaskSpec, got {type(spec).__name__}")
    _validate(spec)
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec_or_factory


# --------------------------------------------------------------------------- loaders per layout


def _wds_loader(kind: str, rel: str, split: str) -> Callable[[Path], dict]:
    fn = {"classification": load_wds_classification, "retrieval": load_wds_retrieval, "vqa": load_wds_vqa}[kind]

    def load(data_root: str | Path) -> dict:
        return fn(Path(data_root) / rel, split)
    load.__name__ = f"load_{rel.replace('/', '_').replace('-', '_')}"
    return load


def _karpathy_loader(json_rel: str) -> Callable[[Path], dict]:
    def load(data_root: str | Path) -> dict:
        json_path = Path(data_root) / json_rel
        return load_karpathy_json(json_path, json_path.parent)
    load.__name__ = f"load_{Path(json_rel).stem}"
    return load


def _cc_loader(tsv_rel: str, shards_rel: str) -> Callable[[Path], dict]:
    def load(data_root: str | Path) -> dict:
        return load_cc_validation(Path(data_root) / tsv_rel, Path(data_root) / shards_rel)
    load.__name__ = "load_cc_validation"
    return load


def _wds_layout(rel: str, kind: str) -> str:
    sample = {"classification": "image (webp/png/jpg) + cls",
              "retrieval": "image + txt (one caption per line)",
              "vqa": "image + json {question, answers, label[, statements, qtype]}"}[kind]
    extra = " + classnames.txt + zeroshot_classification_templates.txt" if kind == "classification" else ""
    style = "CLIP_benchmark-style wds (as synthetic_vqa)" if kind == "vqa" else "CLIP_benchmark wds"
    return f"{style}: {rel}/test/{{0..n-1}}.tar + nshards.txt{extra}; sample = {sample}"


# --------------------------------------------------------------------------- the benchmark

# name, CLIP_benchmark wds folder (HF clip-benchmark/wds_<folder>), main metric, notes
_CLASSIFICATION = [
    ("imagenet1k", "imagenet1k", "acc1", "ImageNet-1K validation (50k); named in the paper"),
    ("imagenetv2", "imagenetv2", "acc1", "ImageNet-V2 matched-frequency"),
    ("imagenet-r", "imagenet-r", "acc1", "ImageNet-Rendition, 200 classes"),
    ("imagenet-a", "imagenet-a", "acc1", "ImageNet-Adversarial, 200 classes"),
    ("imagenet_sketch", "imagenet_sketch", "acc1", "ImageNet-Sketch"),
    ("objectnet", "objectnet", "acc1", "ObjectNet, 113 classes overlapping ImageNet"),
    ("cifar10", "cifar10", "acc1", "CIFAR-10 test"),
    ("cifar100", "cifar100", "acc1", "CIFAR-100 test"),
    ("mnist", "mnist", "acc1", "MNIST test"),
    ("food101", "food101", "acc1", "Food-101 test"),
    ("sun397", "sun397", "acc1", "SUN397 (CLIP_benchmark split)"),
    ("cars", "cars", "acc1", "Stanford Cars test"),
    ("fgvc_aircraft", "fgvc_aircraft", "mean_per_class_recall", "FGVC Aircraft (variant level) test"),
    ("dtd", "dtd", "acc1", "Describable Textures test"),
    ("pets", "vtab-pets", "mean_per_class_recall", "Oxford-IIIT Pets (CLIP_benchmark vtab/pets)"),
    ("caltech101", "vtab-caltech101", "mean_per_class_recall", "Caltech-101 (CLIP_benchmark vtab/caltech101)"),
    ("flowers102", "vtab-flowers", "mean_per_class_recall", "Oxford Flowers-102 (CLIP_benchmark vtab/flowers)"),
]

T2I = "image_retrieval_recall@1"  # text -> image: a caption finds its image
I2T = "text_retrieval_recall@1"   # image -> text: an image finds one of its captions


def _register_benchmark() -> None:
    for name, folder, metric, notes in _CLASSIFICATION:
        rel = f"wds/{folder}"
        register_task(TaskSpec(name=name, kind="classification", main_metric=metric,
                               loader=_wds_loader("classification", rel, "test"), default_path=rel,
                               layout=_wds_layout(rel, "classification"), notes=notes))

    retrieval = [
        # (stem, loader, default path, layout, notes, block size)
        ("coco", _karpathy_loader("coco/coco_test.json"), "coco/coco_test.json",
         'ALBEF coco_test.json (Karpathy 5k test: list of {"image": "val2014/...jpg", "caption": [5]}); '
         "images under coco/<image>",
         "COCO 5k Karpathy test, as DiHT's example_retrieval_eval.py; named in the paper", None),
        ("flickr30k", _karpathy_loader("flickr30k/flickr30k_test.json"), "flickr30k/flickr30k_test.json",
         'ALBEF flickr30k_test.json (1k test: list of {"image": "flickr30k-images/...jpg", "caption": [5]}); '
         "images under flickr30k/<image>",
         "Flickr30K 1k Karpathy test, as DiHT's example_retrieval_eval.py; named in the paper", None),
        ("flickr8k", _wds_loader("retrieval", "wds/flickr8k", "test"), "wds/flickr8k",
         _wds_layout("wds/flickr8k", "retrieval"),
         "Flickr8k 1k Karpathy test (CLIP_benchmark's third retrieval set); reconstruction", None),
        ("xm3600", _wds_loader("retrieval", "wds/crossmodal3600", "test"), "wds/crossmodal3600",
         _wds_layout("wds/crossmodal3600", "retrieval"),
         "Crossmodal-3600, English captions (clip_benchmark_export_wds --dataset crossmodal3600 --retrieval); "
         "reconstruction", None),
        ("cc_val", _cc_loader("cc/Validation_GCC-1.1.0-Validation.tsv", "cc/validation"), "cc",
         "Conceptual Captions validation: cc/Validation_GCC-1.1.0-Validation.tsv (caption<TAB>url, no header) "
         "+ img2dataset shards cc/validation/*.tar (image + json with url)",
         "GCC validation as in diht-gcc-evaluation-report.md: blocks of 2,000 images, each its own gallery, "
         "mean over blocks; captions of dead URLs are dropped and counted; not in the DiHT paper", CC_BLOCK_SIZE),
    ]
    for stem, loader, rel, layout, notes, block in retrieval:
        for direction, metric, what in (("t2i", T2I, "text-to-image"), ("i2t", I2T, "image-to-text")):
            register_task(TaskSpec(name=f"{stem}_{direction}", kind="retrieval", main_metric=metric, loader=loader,
                                   default_path=rel, layout=layout, caption_template=DIHT_CAPTION_TEMPLATE,
                                   notes=f"{what} R@1. {notes}", block_size=block))

    for name, notes in (
        ("vqav2", "VQAv2 val as zero-shot answer selection (candidate answers per question); reconstruction"),
        ("gqa", "GQA testdev-balanced as zero-shot answer selection; reconstruction"),
    ):
        rel = f"wds/{name}"
        register_task(TaskSpec(name=name, kind="vqa", main_metric="accuracy", loader=_wds_loader("vqa", rel, "test"),
                               default_path=rel, layout=_wds_layout(rel, "vqa"), notes=notes))

    # The synthetic tasks: written by the download stage under <data>/eval/<task>/, run by
    # diht_core.benchmark.run_task (kept in sync with its MAIN_METRIC; tests check it).
    for name, kind, metric in (
        ("synthetic_shape", "classification", "acc1"),
        ("synthetic_colour", "classification", "acc1"),
        ("synthetic_count", "classification", "acc1"),
        ("synthetic_retrieval", "retrieval", "mean_recall@1"),
        ("synthetic_vqa", "vqa", "accuracy"),
    ):
        rel = f"eval/{name}"
        register_task(TaskSpec(name=name, kind=kind, main_metric=metric, loader=_wds_loader(kind, rel, "test"),
                               default_path=rel, layout=_wds_layout(rel, kind), synthetic=True,
                               notes="synthetic task generated by the download stage; run by "
                                     "diht_core.benchmark.run_task"))


_register_benchmark()


# --------------------------------------------------------------------------- lookups


def list_tasks(kind: str | None = None, synthetic: bool | None = None) -> list[str]:
    """Registered task names in registration order, optionally of one kind / synthetic or real only."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [n for n, s in _TASKS.items()
            if (kind is None or s.kind == kind) and (synthetic is None or s.synthetic == synthetic)]


def get_task(name: str) -> TaskSpec:
    """The spec of a task; an unknown name raises ValueError listing close matches."""
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), list(_TASKS), n=5, cutoff=0.5)
    close += [n for n in _TASKS if str(name).lower() in n and n not in close][:5]
    hint = f"; did you mean: {', '.join(close)}?" if close else f"; known tasks: {', '.join(_TASKS)}"
    raise ValueError(f"unknown task {name!r}{hint}")


def default_tasks() -> list[str]:
    """The tasks run by default: the synthetic ones (their data is generated, never downloaded)."""
    return list_tasks(synthetic=True)


def resolve(name: str, data_root: str | Path) -> tuple[TaskSpec, dict]:
    """(spec, loaded data) of a task; raises DatasetNotFound (message: task, path, layout) if absent."""
    spec = get_task(name)
    try:
        data = spec.loader(Path(data_root))
    except DatasetNotFound as err:
        raise DatasetNotFound(f"task {name!r}: {err} [expected at {spec.path(data_root)}: {spec.layout}]") from err
    return spec, data


def check_available(names, data_root: str | Path) -> dict[str, str]:
    """name -> "ok" | "skipped: <reason>" for each task (None: every registered task).

    A task is "ok" when its loader succeeds (images stay lazy, so this reads only tar headers,
    labels and captions). Absent data and unreadable data are both reported with their reason.
    """
    names = list_tasks() if names is None else [names] if isinstance(names, str) else list(names)
    report = {}
    for name in names:
        spec = get_task(name)
        try:
            resolve(name, data_root)
            report[name] = "ok"
        except DatasetNotFound as err:
            report[name] = f"skipped: data not found: {err}"
        except (ValueError, OSError, KeyError, tarfile.TarError, json.JSONDecodeError) as err:
            report[name] = f"skipped: unreadable data at {spec.path(data_root)}: {type(err).__name__}: {err}"
    return report


def run_synthetic(name: str, model, tokenizer, data_root: str | Path, image_size: int, batch_size: int = 256) -> dict:
    """Run a synthetic task with diht_core.benchmark.run_task (data under <data_root>/eval/)."""
    spec = get_task(name)
    if not spec.synthetic:
        raise ValueError(f"{name!r} is not a synthetic task; load it with resolve() and evaluate it yourself")
    from ..benchmark import run_task  # heavy import (model code), only when needed

    return run_task(name, model, tokenizer, Path(data_root) / "eval", image_size, batch_size)
