"""Stage `fewshot`: k-shot linear probes, prompt-initialised PGD vs. from scratch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diht_core.data.files import atomic_write_text
from diht_core.eval.fewshot import fewshot_curve
from diht_core.eval.report import fewshot_curve_png
from diht_core.models.trained import load_trained

from ._stage import cli, make_task


def body(p, run) -> dict:
    f = p.fewshot
    model, _, tokenizer = load_trained(p.benchmark, p.train, p.paths)
    res = fewshot_curve(model, tokenizer, Path(p.paths.data) / "eval" / f.task, f,
                        max_pixels=p.download.url_list.max_pixels)
    curve = pd.DataFrame(res["curve"])
    plots = Path(p.paths.plots)
    plots.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plots / "fewshot_curve.csv", curve.to_csv(index=False))
    fewshot_curve_png(curve, res["zero_shot"], plots / "fewshot_curve.png")
    run.log_artifact(plots / "fewshot_curve.png", "plots")
    for row in res["curve"]:
        run.log_step(int(row["k"]), {"pgd_acc": row["pgd_mean"], "scratch_acc": row["scratch_mean"]})
    for split, counts in res.get("skipped", {}).items():
        print(f"[fewshot] {f.task}/{split}: {counts['skipped_samples']} bad samples skipped "
              f"{counts['skipped_by_reason']}, truncated shards {sorted(counts['truncated_shards'])}")
    return {"task": f.task, "zero_shot_acc": res["zero_shot"],
            "kshot": {f"k{int(r['k'])}": {"pgd": r["pgd_mean"], "scratch": r["scratch_mean"]} for r in res["curve"]},
            "curve": res["curve"], **({"skipped": res["skipped"]} if "skipped" in res else {})}


fewshot = make_task("fewshot", body)

if __name__ == "__main__":
    cli("fewshot", body)
