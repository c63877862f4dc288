"""Stage `benchmark`: the synthetic zero-shot tasks on the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diht_core.benchmark import MAIN_METRIC, clip_benchmark_record, markdown_table, run_registered, run_task
from diht_core.models import create_model, image_size

from ._stage import cli, make_task


def load_trained(p, with_preprocess: bool = False):
    """The model to evaluate: benchmark.checkpoint (any open_clip/DiHT checkpoint) or the trained one."""
    path = Path(p.benchmark.checkpoint or Path(p.paths.models) / "model.pt")
    if not path.exists():
        hint = "" if p.benchmark.checkpoint else ": run the train stage first"
        raise FileNotFoundError(f"{path} not found{hint}")
    model, preprocess, tokenizer = create_model(p.benchmark.model or p.train.model, pretrained=str(path))
    return (model.eval(), preprocess, tokenizer) if with_preprocess else (model.eval(), tokenizer)


def body(p, run) -> dict:
    model, preprocess, tokenizer = load_trained(p, with_preprocess=True)
    eval_root = Path(p.paths.data) / "eval"
    results = {}
    for name in p.benchmark.tasks:
        if name in MAIN_METRIC:  # the built-in synthetic tasks
            results[name] = run_task(name, model, tokenizer, eval_root, image_size(model), p.benchmark.batch_size)
        else:
            results[name] = run_registered(name, model, preprocess, tokenizer, p.benchmark.data_root,
                                           p.benchmark.batch_size)
        if "skipped" in results[name]:
            print(f"[benchmark] {name}: skipped: {results[name]['skipped']}")
    done = [r for r in results.values() if "main" in r]
    per_task = Path(p.paths.metrics) / "benchmark"
    per_task.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        if "main" in r:
            record = clip_benchmark_record(name, r, p.benchmark.model or p.train.model,
                                           str(p.benchmark.checkpoint or Path(p.paths.models) / "model.pt"))
            (per_task / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    table = markdown_table(results)
    run.mlflow.log_text(table, "benchmark.md")
    _prefect_artifact(table)
    return {
        "tasks": results,
        "mean_main": float(np.mean([r["main"] for r in done])) if done else float("nan"),
        "mean_chance": float(np.mean([r["chance"] for r in done])) if done else float("nan"),
    }


def _prefect_artifact(table: str) -> None:
    """A markdown artifact on the Prefect run, when there is one (not from the plain CLI)."""
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:  # no flow or task run: dvc repro or the CLI
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=table, key="diht-benchmark", description="DiHT synthetic zero-shot benchmark")


benchmark = make_task("benchmark", body)

if __name__ == "__main__":
    cli("benchmark", body)
