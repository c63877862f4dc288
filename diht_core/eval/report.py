"""Report formats: the benchmark's markdown table and summary, CLIP_benchmark records, the few-shot curve plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import pyplot, save_figure
from .registry import get_task

CLIP_BENCHMARK_TASK = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                       "vqa": "vqa_answer_selection"}


def markdown_table(results: dict[str, dict]) -> str:
    """The main metric of every task against chance, and the mean over the tasks that ran."""
    rows = ["| task | metric | result | chance |", "|---|---|---|---|"]
    done = []
    for name, r in results.items():
        if "main" in r:
            rows.append(f"| {name} | {get_task(name).main_metric} | {r['main']:.3f} | {r['chance']:.3f} |")
            done.append(r["main"])
        else:
            rows.append(f"| {name} | skipped: {r.get('skipped')} | | |")
    if done:
        rows.append(f"| **mean of main metrics** ({len(done)} tasks) | | {np.mean(done):.3f} | |")
    return "\n".join(rows)


def summary(results: dict[str, dict]) -> dict:
    """The benchmark's metrics: every task's result and the means of main metric and chance over those that ran."""
    done = [r for r in results.values() if "main" in r]
    return {
        "tasks": results,
        "mean_main": float(np.mean([r["main"] for r in done])) if done else float("nan"),
        "mean_chance": float(np.mean([r["chance"] for r in done])) if done else float("nan"),
    }


def clip_benchmark_record(name: str, metrics: dict, model: str, pretrained: str) -> dict:
    """One task's result in CLIP_benchmark's JSON format."""
    return {"dataset": name, "model": model, "pretrained": pretrained, "task": CLIP_BENCHMARK_TASK[get_task(name).kind],
            "metrics": {k: v for k, v in metrics.items() if k not in ("main", "chance")}, "language": "en"}


def fewshot_curve_png(curve, zero_shot: float, path: str | Path) -> None:
    """The k-shot curve (a DataFrame of run_fewshot's curve): PGD and scratch mean +- std, zero-shot level."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(curve.k, curve.pgd_mean, curve.pgd_std, marker="o", label="prompt-init PGD")
    ax.errorbar(curve.k, curve.scratch_mean, curve.scratch_std, marker="s", label="from scratch")
    ax.axhline(zero_shot, ls="--", c="gray", label="zero-shot")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy")
    ax.legend()
    save_figure(fig, path)
