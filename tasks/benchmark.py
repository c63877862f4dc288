"""Stage `benchmark`: the synthetic zero-shot tasks on the trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diht_core.benchmark import run_task
from diht_core.models import create_model, image_size

from ._stage import cli, make_task


def load_trained(p):
    path = Path(p.paths.models) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the train stage first")
    model, _, tokenizer = create_model(p.train.model, pretrained=str(path))
    return model.eval(), tokenizer


def body(p, run) -> dict:
    model, tokenizer = load_trained(p)
    eval_root = Path(p.paths.data) / "eval"
    results = {}
    for name in p.benchmark.tasks:
        results[name] = run_task(name, model, tokenizer, eval_root, image_size(model), p.benchmark.batch_size)
        if "skipped" in results[name]:
            print(f"[benchmark] {name}: skipped: {results[name]['skipped']}")
    done = [r for r in results.values() if "main" in r]
    return {
        "tasks": results,
        "mean_main": float(np.mean([r["main"] for r in done])) if done else float("nan"),
        "mean_chance": float(np.mean([r["chance"] for r in done])) if done else float("nan"),
    }


benchmark = make_task("benchmark", body)

if __name__ == "__main__":
    cli("benchmark", body)
