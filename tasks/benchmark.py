"""Stage `benchmark`: the zero-shot tasks of benchmark.tasks on the trained model."""

from __future__ import annotations

import json
from pathlib import Path

from diht_core.data.files import atomic_write_text
from diht_core.eval.report import clip_benchmark_record, markdown_table, summary
from diht_core.eval.runner import run_benchmark
from diht_core.models.trained import evaluated, load_trained

from ._stage import cli, make_task


def body(p, run) -> dict:
    model, preprocess, tokenizer = load_trained(p.benchmark, p.train, p.paths)
    results = run_benchmark(p.benchmark, p.paths.data, model, preprocess, tokenizer, p.download.url_list.max_pixels)
    for name, r in results.items():
        if "skipped" in r:
            print(f"[benchmark] {name}: skipped: {r['skipped']}")
        if r.get("skipped_samples") or r.get("truncated_shards"):
            print(f"[benchmark] {name}: {r['skipped_samples']} bad samples skipped {r['skipped_by_reason']}, "
                  f"truncated shards {sorted(r['truncated_shards'])}")
    per_task = Path(p.paths.metrics) / "benchmark"
    per_task.mkdir(parents=True, exist_ok=True)
    model_name, checkpoint = evaluated(p.benchmark, p.train, p.paths)
    for name, r in results.items():
        if "main" in r:
            record = clip_benchmark_record(name, r, model_name, str(checkpoint))
            atomic_write_text(per_task / f"{name}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    table = markdown_table(results)
    run.mlflow.log_text(table, "benchmark.md")
    _prefect_artifact(table)
    return summary(results)


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
