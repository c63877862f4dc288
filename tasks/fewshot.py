"""Stage `fewshot`: k-shot linear probes, prompt-initialised PGD vs. from scratch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diht_core.benchmark import classification_features
from diht_core.fewshot import run_fewshot
from diht_core.models import image_size

from diht_core.plots import pyplot, save_figure

from ._stage import cli, make_task
from .benchmark import load_trained


def body(p, run) -> dict:
    f = p.fewshot
    model, tokenizer = load_trained(p)
    task_dir = Path(p.paths.data) / "eval" / f.task
    size = image_size(model)
    tr_x, tr_y, W0 = classification_features(model, tokenizer, task_dir, "train", size, 256)
    va_x, va_y, _ = classification_features(model, tokenizer, task_dir, "val", size, 256)
    te_x, te_y, _ = classification_features(model, tokenizer, task_dir, "test", size, 256)
    res = run_fewshot(tr_x, tr_y, va_x, va_y, te_x, te_y, W0, shots=f.shots, seeds=list(range(f.seeds)),
                      deltas=f.deltas, weight_decays=f.weight_decays, steps=f.steps, lr=f.lr,
                      delta_bs=f.delta_bs)
    curve = pd.DataFrame(res["curve"])
    plots = Path(p.paths.plots)
    plots.mkdir(parents=True, exist_ok=True)
    curve.to_csv(plots / "fewshot_curve.csv", index=False)
    _curve_png(curve, res["zero_shot"], plots / "fewshot_curve.png")
    run.log_artifact(plots / "fewshot_curve.png", "plots")
    for row in res["curve"]:
        run.log_step(int(row["k"]), {"pgd_acc": row["pgd_mean"], "scratch_acc": row["scratch_mean"]})
    return {"task": f.task, "zero_shot_acc": res["zero_shot"],
            "kshot": {f"k{int(r['k'])}": {"pgd": r["pgd_mean"], "scratch": r["scratch_mean"]} for r in res["curve"]},
            "curve": res["curve"]}


def _curve_png(curve: pd.DataFrame, zero_shot: float, path: Path) -> None:
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


fewshot = make_task("fewshot", body)

if __name__ == "__main__":
    cli("fewshot", body)
