"""The synthetic zero-shot tasks: classification (shape, colour, count), retrieval and VQA.

Each task reads CLIP_benchmark's wds layout written by the download stage and reports its
metrics, its main metric and the chance level of that metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import normalize_images
from .data.shards import load_split
from .eval.retrieval import retrieval_metrics
from .eval.vqa import vqa_accuracy
from .eval.zeroshot import build_classifier, zero_shot_classification

MAIN_METRIC = {
    "synthetic_shape": "acc1",
    "synthetic_colour": "acc1",
    "synthetic_count": "acc1",
    "synthetic_retrieval": "mean_recall@1",
    "synthetic_vqa": "accuracy",
}


TASK_TYPE = {"synthetic_shape": "zeroshot_classification", "synthetic_colour": "zeroshot_classification",
             "synthetic_count": "zeroshot_classification", "synthetic_retrieval": "zeroshot_retrieval",
             "synthetic_vqa": "vqa_answer_selection"}


def _encode_pil(model, preprocess, images, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of PIL images through the model's own eval preprocessing (resize, crop, normalise)."""
    out, buf = [], []
    with torch.no_grad():
        for img in images:
            buf.append(preprocess(img.convert("RGB")))
            if len(buf) == batch_size:
                out.append(model.encode_image(torch.stack(buf)))
                buf = []
        if buf:
            out.append(model.encode_image(torch.stack(buf)))
    return F.normalize(torch.cat(out).float(), dim=-1)


def run_registered(name: str, model, preprocess, tokenizer, data_root: str | Path, batch_size: int = 256) -> dict:
    """A real task of the registry (diht_core.eval.registry); absent data comes back as skipped, with the reason."""
    from .eval.datasets import DatasetNotFound
    from .eval.registry import resolve

    try:
        spec, data = resolve(name, data_root)
    except DatasetNotFound as err:
        return {"skipped": str(err)}
    model.eval()
    encode = text_encoder(model, tokenizer, batch_size)
    img = _encode_pil(model, preprocess, data["images"], batch_size)
    if spec.kind == "classification":
        W = build_classifier(encode, data["classnames"], data["templates"])
        metrics = zero_shot_classification(img, W, data["labels"])
        chance = 1.0 / W.shape[1]
    elif spec.kind == "retrieval":
        txt = encode(spec.wrap_captions(data["captions"]))
        metrics = retrieval_metrics(img, txt, data["text_to_image"], ks=(1, 5, 10), block_size=spec.block_size)
        chance = 1.0 / min(len(img), spec.block_size or len(img))
    else:
        st = encode_statements(encode, data["statements"])
        metrics = vqa_accuracy(img, st, torch.as_tensor(data["labels"]), data.get("qtypes"))
        chance = metrics.get("chance", float("nan"))
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    counts = {k: int(data[k]) for k in ("missing", "total") if k in data}  # e.g. CC captions of dead URLs
    return {**metrics, **counts, "main": float(metrics[spec.main_metric]), "chance": float(chance)}


def markdown_table(results: dict[str, dict]) -> str:
    """The main metric of every task against chance, and the mean over the tasks that ran."""
    rows = ["| task | metric | result | chance |", "|---|---|---|---|"]
    done = []
    for name, r in results.items():
        if "main" in r:
            rows.append(f"| {name} | {_main_metric(name)} | {r['main']:.3f} | {r['chance']:.3f} |")
            done.append(r["main"])
        else:
            rows.append(f"| {name} | skipped: {r.get('skipped')} | | |")
    if done:
        rows.append(f"| **mean of main metrics** ({len(done)} tasks) | | {np.mean(done):.3f} | |")
    return "\n".join(rows)


def _main_metric(name: str) -> str:
    if name in MAIN_METRIC:
        return MAIN_METRIC[name]
    from .eval.registry import get_task

    return get_task(name).main_metric


def clip_benchmark_record(name: str, metrics: dict, model: str, pretrained: str) -> dict:
    """One task's result in CLIP_benchmark's JSON format."""
    if name in TASK_TYPE:
        task = TASK_TYPE[name]
    else:
        from .eval.registry import get_task

        task = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                "vqa": "vqa_answer_selection"}[get_task(name).kind]
    return {"dataset": name, "model": model, "pretrained": pretrained, "task": task,
            "metrics": {k: v for k, v in metrics.items() if k not in ("main", "chance")}, "language": "en"}


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    out = [model.encode_image(normalize_images(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def text_encoder(model, tokenizer, batch_size: int = 256):
    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        out = [model.encode_text(tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)
    return encode


def encode_statements(encode, statements: list[list[str]]) -> torch.Tensor:
    """[questions, max answers, d] statement embeddings; questions with fewer answers are padded with NaN rows."""
    flat = encode([s for row in statements for s in row])
    out = torch.full((len(statements), max(map(len, statements)), flat.shape[1]), float("nan"))
    offset = 0
    for i, row in enumerate(statements):
        out[i, :len(row)] = flat[offset:offset + len(row)]
        offset += len(row)
    return out


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def classification_features(model, tokenizer, task_dir: Path, split: str, image_size: int, batch_size: int):
    """(image embeddings, labels, zero-shot classifier W0 [d, C]) for one split of a task."""
    data = load_split(task_dir / split, image_size)
    classnames = read_lines(task_dir / "classnames.txt")
    templates = read_lines(task_dir / "zeroshot_classification_templates.txt")
    W0 = build_classifier(text_encoder(model, tokenizer, batch_size), classnames, templates)
    return encode_images(model, data["images"], batch_size), data["cls"], W0


def run_task(name: str, model, tokenizer, eval_root: str | Path, image_size: int, batch_size: int = 256) -> dict:
    """Metrics of one synthetic task, with "main" and "chance" added."""
    task_dir = Path(eval_root) / name
    if not task_dir.exists():
        return {"skipped": f"data not found at {task_dir}"}
    model.eval()
    if name in ("synthetic_shape", "synthetic_colour", "synthetic_count"):
        emb, labels, W0 = classification_features(model, tokenizer, task_dir, "test", image_size, batch_size)
        metrics = zero_shot_classification(emb, W0, labels)
        chance = 1.0 / W0.shape[1]
    elif name == "synthetic_retrieval":
        data = load_split(task_dir / "test", image_size)
        captions, text_to_image = [], []
        for i, t in enumerate(data["txt"]):
            for c in t.split("\n"):
                captions.append(c)
                text_to_image.append(i)
        img = encode_images(model, data["images"], batch_size)
        txt = text_encoder(model, tokenizer, batch_size)(captions)
        metrics = retrieval_metrics(img, txt, torch.tensor(text_to_image), ks=(1, 5, 10))
        chance = 1.0 / len(data["images"])  # R@1 of a random ranking, both directions
    elif name == "synthetic_vqa":
        data = load_split(task_dir / "test", image_size)
        encode = text_encoder(model, tokenizer, batch_size)
        st = encode_statements(encode, [q["statements"] for q in data["json"]])
        img = encode_images(model, data["images"], batch_size)
        labels = torch.tensor([q["label"] for q in data["json"]])
        metrics = vqa_accuracy(img, st, labels, [q["qtype"] for q in data["json"]])
        chance = float(np.mean([1.0 / len(q["answers"]) for q in data["json"]]))
    else:
        raise ValueError(f"unknown task {name!r}")
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    return {**metrics, "main": float(metrics[MAIN_METRIC[name]]), "chance": float(chance)}
