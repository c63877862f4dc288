"""metrics/summary.json: the headline numbers of a run, numbers only, for `dvc metrics show` and `dvc exp show`
(dvc.yaml's top-level `metrics`; the wide per-stage files stay beside it). Written by the flow after its stages and by
the DVC stage `summary` (`python -m tasks.summary`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from diht_core.config import Params, ParamsError, load_params
from diht_core.data.files import atomic_write_text

from ._cli import BAD_PARAMS_EXIT, add_params_args, fail, overrides_or_exit

SUMMARY = "summary.json"


def _number(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _read(metrics_dir: Path, stage: str) -> dict:
    path = metrics_dir / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def headline(metrics_dir: str | Path) -> dict:
    """From metrics/<stage>.json: the benchmark's mean and every task's main metric, CAT's kept fraction, the final
    train loss, the few-shot zero-shot accuracy and PGD accuracy at the most shots. A stage whose file is missing, or
    a value that is not a finite number, is left out."""
    d = Path(metrics_dir)
    bench, cat, train, few = (_read(d, s) for s in ("benchmark", "cat_filter", "train", "fewshot"))
    out = {
        "benchmark": {"mean_main": bench.get("mean_main"),
                      **{t: r.get("main") for t, r in sorted(bench.get("tasks", {}).items())}},
        "cat_filter": {"kept_fraction": cat.get("kept_fraction")},
        "train": {"final_loss": train.get("final_loss")},
        "fewshot": {"zero_shot_acc": few.get("zero_shot_acc")},
    }
    curve = few.get("curve") or []
    if curve:
        last = max(curve, key=lambda r: r["k"])
        out["fewshot"][f"pgd_k{int(last['k'])}"] = last.get("pgd_mean")
    numbers = {s: {k: _number(v) for k, v in part.items()} for s, part in out.items()}
    return {s: {k: v for k, v in part.items() if v is not None} for s, part in numbers.items()
            if any(v is not None for v in part.values())}


def write_summary(params: Params) -> Path:
    """<paths.metrics>/summary.json from the stage metrics there now."""
    path = Path(params.paths.metrics) / SUMMARY
    return atomic_write_text(path, json.dumps(headline(params.paths.metrics), indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.summary",
                                     description="Write metrics/summary.json, the headline numbers of the last run.")
    add_params_args(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, overrides_or_exit(args))  # no model names to check (params_or_exit)
    except ParamsError as err:
        fail(err, BAD_PARAMS_EXIT)
    print(f"{write_summary(params)}: {json.dumps(headline(params.paths.metrics))}")


if __name__ == "__main__":
    main()
