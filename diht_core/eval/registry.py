"""The evaluation task registry: DiHT's 29-task zero-shot benchmark, the extra cc_val tasks and the 6 synthetic
tasks."""

from __future__ import annotations

import difflib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import catalog
from ..data.eval_datasets import (DatasetNotFound, load_cc_validation, load_karpathy_json,
                                  load_wds_classification, load_wds_retrieval, load_wds_vqa)
from ..data.shards import Faults

KINDS = ("classification", "retrieval", "vqa")
DIHT_CAPTION_TEMPLATE = "a photo of {}."  # DiHT wraps every retrieval caption (example_retrieval_eval.py)
T2I, I2T = (d[1] for d in catalog.DIRECTIONS)


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task.

    loader: (data_root, max_pixels, faults) -> the loaded data (see diht_core.data.eval_datasets), reading
    ``<data_root>/<default_path>``, its bad samples counted in faults (a data.shards.Faults; None: an error); caption_template: applied to every caption before encoding
    (retrieval; None = captions as they are); block_size: galleries of blocks of that many data rows
    (None = one gallery; the loader's "blocks" say which images form each); synthetic: read at the model's image
    size by diht_core.eval.runner.run_task; extra: a real task outside DiHT's 29 (cc_val).
    """

    name: str
    kind: str
    main_metric: str
    loader: Callable[..., dict]
    default_path: str
    layout: str
    caption_template: str | None = None
    notes: str = ""
    synthetic: bool = False
    split: str = "test"
    block_size: int | None = None
    extra: bool = False

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
    """Register a TaskSpec, or decorate a zero-argument factory returning one (returned unchanged).

    timm-style: ``list_tasks`` / ``get_task`` look the registered tasks up.
    """
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


def _wds_loader(kind: str, rel: str, split: str) -> Callable[..., dict]:
    fn = {"classification": load_wds_classification, "retrieval": load_wds_retrieval, "vqa": load_wds_vqa}[kind]

    def load(data_root: str | Path, max_pixels: int | None = None, faults: Faults | None = None) -> dict:
        return fn(Path(data_root) / rel, split, max_pixels, faults)
    load.__name__ = f"load_{rel.replace('/', '_').replace('-', '_')}"
    return load


def _karpathy_loader(json_rel: str) -> Callable[..., dict]:
    def load(data_root: str | Path, max_pixels: int | None = None, faults: Faults | None = None) -> dict:
        json_path = Path(data_root) / json_rel
        return load_karpathy_json(json_path, json_path.parent, max_pixels, faults)
    load.__name__ = f"load_{Path(json_rel).stem}"
    return load


def _cc_loader(tsv_rel: str, shards_rel: str) -> Callable[..., dict]:
    def load(data_root: str | Path, max_pixels: int | None = None, faults: Faults | None = None) -> dict:
        return load_cc_validation(Path(data_root) / tsv_rel, Path(data_root) / shards_rel, catalog.CC_ROWS,
                                  catalog.CC_BLOCK_SIZE, max_pixels, faults)
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


def _retrieval_source(layout: str, rel: str) -> tuple[Callable[..., dict], str]:
    """(loader, layout description) of a retrieval set in one of catalog.RETRIEVAL's layouts."""
    if layout == "karpathy":
        folder = rel.split("/")[0]
        return _karpathy_loader(rel), (f'ALBEF {Path(rel).name} (Karpathy test: list of {{"image": "...jpg", '
                                       f'"caption": [5]}}); images under {folder}/<image>')
    if layout == "wds":
        return _wds_loader("retrieval", rel, "test"), _wds_layout(rel, "retrieval")
    return (_cc_loader(f"{rel}/Validation_GCC-1.1.0-Validation.tsv", f"{rel}/validation"),
            f"Conceptual Captions validation: {rel}/Validation_GCC-1.1.0-Validation.tsv (caption<TAB>url, no header) "
            f"+ img2dataset shards {rel}/validation/*.tar (image + json with url; the shards' *.parquet, when there, "
            f"tell dead URLs from rows never downloaded)")


def _register_benchmark() -> None:
    """Every row of catalog.py as a TaskSpec.

    The paper only names ImageNet-1K, COCO and Flickr30K among its 17 classification, 10 retrieval
    and 2 VQA tasks; the rest is a reconstruction, see docs/benchmark_tasks.md. cc_val is registered as an extra
    task, outside the 29.
    """
    for name, folder, metric, notes in catalog.CLASSIFICATION:
        rel = f"wds/{folder}"
        register_task(TaskSpec(name=name, kind="classification", main_metric=metric,
                               loader=_wds_loader("classification", rel, "test"), default_path=rel,
                               layout=_wds_layout(rel, "classification"), notes=notes))
    for rows, extra in ((catalog.RETRIEVAL, False), (catalog.EXTRA_RETRIEVAL, True)):
        for stem, source, rel, notes in rows:
            loader, layout = _retrieval_source(source, rel)
            block = catalog.CC_BLOCK_SIZE if source == "cc" else None
            for direction, metric, what in catalog.DIRECTIONS:
                register_task(TaskSpec(name=f"{stem}_{direction}", kind="retrieval", main_metric=metric,
                                       loader=loader, default_path=rel, layout=layout,
                                       caption_template=DIHT_CAPTION_TEMPLATE, notes=f"{what} R@1. {notes}",
                                       block_size=block, extra=extra))
    for name, notes in catalog.VQA:
        rel = f"wds/{name}"
        register_task(TaskSpec(name=name, kind="vqa", main_metric="accuracy", loader=_wds_loader("vqa", rel, "test"),
                               default_path=rel, layout=_wds_layout(rel, "vqa"), notes=notes))
    for name, kind, metric in catalog.SYNTHETIC:  # written by the download stage under <data>/eval/<task>/
        rel = f"eval/{name}"
        register_task(TaskSpec(name=name, kind=kind, main_metric=metric, loader=_wds_loader(kind, rel, "test"),
                               default_path=rel, layout=_wds_layout(rel, kind), synthetic=True,
                               notes="synthetic task generated by the download stage"))


_register_benchmark()


# --------------------------------------------------------------------------- lookups


def list_tasks(kind: str | None = None, synthetic: bool | None = None, extra: bool | None = None) -> list[str]:
    """Registered task names in registration order, optionally of one kind / synthetic or real only / extra or not."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [n for n, s in _TASKS.items()
            if (kind is None or s.kind == kind) and (synthetic is None or s.synthetic == synthetic)
            and (extra is None or s.extra == extra)]


def diht_tasks() -> list[str]:
    """DiHT's 29-task zero-shot benchmark (17 classification, 10 retrieval, 2 VQA) as reconstructed here."""
    return list_tasks(synthetic=False, extra=False)


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


def resolve(name: str, data_root: str | Path, max_pixels: int | None = None,
            faults: Faults | None = None) -> tuple[TaskSpec, dict]:
    """(spec, loaded data) of a task; raises DatasetNotFound (message: task, path, layout) if absent. Its bad samples
    (images checked against max_pixels; None: PIL's own limit) are counted in faults (None: a bad sample is an
    error)."""
    spec = get_task(name)
    try:
        data = spec.loader(Path(data_root), max_pixels, faults)
    except DatasetNotFound as err:
        raise DatasetNotFound(f"task {name!r}: {err} [expected at {spec.path(data_root)}: {spec.layout}]") from err
    return spec, data


def check_available(names, data_root: str | Path) -> dict[str, str]:
    """name -> "ok" | "ok, <bad samples it would skip>" | "skipped: <reason>" for each task (None: every registered
    task).

    A task is "ok" when its loader succeeds (it reads the labels and captions and checks every image, keeping none).
    Absent data and unreadable data are both reported with their reason: no task is ever silently dropped.
    """
    names = list_tasks() if names is None else [names] if isinstance(names, str) else list(names)
    report = {}
    for name in names:
        spec = get_task(name)
        faults = Faults()
        try:
            resolve(name, data_root, faults=faults)
            report[name] = f"ok, {faults.summary()}" if faults.skipped or faults.truncated else "ok"
        except DatasetNotFound as err:
            report[name] = f"skipped: data not found: {err}"
        except (ValueError, OSError, KeyError, tarfile.TarError, json.JSONDecodeError) as err:
            report[name] = f"skipped: unreadable data at {spec.path(data_root)}: {type(err).__name__}: {err}"
    return report

