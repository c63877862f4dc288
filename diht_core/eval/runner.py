"""The benchmark runner: any task of the registry, synthetic or real, encoded and scored by its kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import BenchmarkParams
from ..data.eval_datasets import DatasetNotFound, load_synthetic
from ..data.shards import Faults
from ..models import image_size
from .encoders import encode_images, encode_pil, encode_statements, text_encoder
from .registry import TaskSpec, get_task, resolve
from .retrieval import block_retrieval_metrics, retrieval_metrics
from .vqa import vqa_accuracy
from .zeroshot import build_classifier, zero_shot_classification


def run_task(name: str, model, preprocess, tokenizer, data_root: str | Path, synthetic_root: str | Path | None = None,
             batch_size: int = BenchmarkParams().batch_size, max_pixels: int | None = None) -> dict:
    """Metrics of one task with "main" (its main metric) and "chance" added; {"skipped": reason} without data.

    Real tasks read ``<data_root>/<spec.default_path>`` through the model's preprocess; synthetic ones
    ``<synthetic_root>/eval/<task>`` (the download stage's; default: data_root), decoded at the model's image size.
    Bad samples of either (over max_pixels in the header, bad json, a missing or empty caption or label where one
    is needed, undecodable) and truncated shards are skipped with their captions or labels and reported
    ("skipped_samples", "skipped_by_reason", "truncated_shards", only when there are any).
    """
    spec = get_task(name)
    faults = Faults()
    if spec.synthetic:
        task_dir = spec.path(data_root if synthetic_root is None else synthetic_root)
        if not task_dir.exists():
            return {"skipped": f"data not found at {task_dir}"}
        model.eval()
        data = load_synthetic(task_dir, spec.kind, image_size(model), max_pixels=max_pixels, faults=faults)
        img = encode_images(model, data["images"], batch_size)
    else:
        try:
            spec, data = resolve(name, data_root, max_pixels, faults)
        except DatasetNotFound as err:
            return {"skipped": str(err)}
        model.eval()
        img = encode_pil(model, preprocess, data["images"], batch_size)
    metrics, chance = score(spec, img, text_encoder(model, tokenizer, batch_size), data)
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, list)}  # "blocks": {block: its metrics}
    counts = {k: int(data[k]) for k in ("missing", "total") if k in data}  # e.g. CC captions of dead URLs
    counts.update(faults.report())
    return {**metrics, **counts, "main": float(metrics[spec.main_metric]), "chance": float(chance)}


def score(spec: TaskSpec, img: torch.Tensor, encode, data: dict) -> tuple[dict, float]:
    """(metrics, chance level of the main metric) of the image embeddings against the task's texts."""
    if spec.kind == "classification":
        W = build_classifier(encode, data["classnames"], data["templates"])
        return zero_shot_classification(img, W, data["labels"]), 1.0 / W.shape[1]
    if spec.kind == "retrieval":
        txt = encode(spec.wrap_captions(data["captions"]))
        if "blocks" not in data:
            return retrieval_metrics(img, txt, data["text_to_image"], ks=(1, 5, 10)), 1.0 / len(img)  # random R@1
        metrics = block_retrieval_metrics(img, txt, data["text_to_image"], data["blocks"], ks=(1, 5, 10))
        full = [b for b in metrics["blocks"].values() if b["full"]]  # random R@1, averaged as the metric is
        return metrics, float(np.mean([1.0 / b["images"] for b in full])) if full else float("nan")
    st = encode_statements(encode, data["statements"])
    metrics = vqa_accuracy(img, st, torch.as_tensor(data["labels"]), data.get("qtypes"))
    if spec.synthetic:  # the mean of 1 / candidates in float64, as the synthetic tasks have always reported it
        return metrics, float(np.mean([1.0 / len(a) for a in data["answers"]]))
    return metrics, metrics.get("chance", float("nan"))


def run_benchmark(bench: BenchmarkParams, data_dir: str | Path, model, preprocess, tokenizer,
                  max_pixels: int | None = None) -> dict[str, dict]:
    """task -> result (run_task) for every task of bench.tasks; synthetic data under <data_dir>/eval/."""
    return {name: run_task(name, model, preprocess, tokenizer, bench.data_root, data_dir, bench.batch_size, max_pixels)
            for name in bench.tasks}
