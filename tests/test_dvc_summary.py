"""What DVC shows: metrics/summary.json (tasks/summary.py) as the only top-level metrics file, numbers only; every
`dvc plots show` chart a PNG that renders offline (no script from a CDN)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT
from diht_core.config import validate_params
from tasks.summary import headline, write_summary

DVC = str(Path(sys.executable).parent / "dvc")


def _write(folder: Path, stage: str, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps(metrics))


def _stage_metrics(folder: Path) -> None:
    _write(folder, "benchmark", {"tasks": {"synthetic_shape": {"main": 0.5, "chance": 0.25, "acc5": 1.0},
                                           "synthetic_vqa": {"main": 0.3, "chance": 0.2},
                                           "imagenet1k": {"skipped": "no data"}},
                                 "mean_main": 0.4, "mean_chance": 0.225})
    _write(folder, "cat_filter", {"kept_fraction": 0.68, "funnel": {"in": 100, "kept": 68}, "truncated_shards": {}})
    _write(folder, "train", {"final_loss": 3.9, "model": "diht-tiny-vit", "device": "cpu", "distillation": True})
    _write(folder, "fewshot", {"task": "synthetic_shape", "zero_shot_acc": 0.25,
                               "curve": [{"k": 0, "pgd_mean": 0.25}, {"k": 4, "pgd_mean": 0.5},
                                         {"k": 2, "pgd_mean": 0.4}]})


def test_headline_numbers_from_the_stage_files(tmp_path):
    _stage_metrics(tmp_path)
    assert headline(tmp_path) == {
        "benchmark": {"mean_main": 0.4, "synthetic_shape": 0.5, "synthetic_vqa": 0.3},
        "cat_filter": {"kept_fraction": 0.68},
        "train": {"final_loss": 3.9},
        "fewshot": {"zero_shot_acc": 0.25, "pgd_k4": 0.5},
    }


def test_headline_leaves_out_missing_stages_and_non_numbers(tmp_path):
    _write(tmp_path, "train", {"final_loss": float("nan"), "device": "cpu"})
    _write(tmp_path, "cat_filter", {"kept_fraction": 0.5})
    assert headline(tmp_path) == {"cat_filter": {"kept_fraction": 0.5}}
    assert headline(tmp_path / "nothing") == {}


def test_write_summary_is_numbers_only(tmp_path):
    _stage_metrics(tmp_path / "metrics")
    params = validate_params({"paths": {"metrics": str(tmp_path / "metrics")}})
    out = json.loads(write_summary(params).read_text())
    values = [v for part in out.values() for v in part.values()]
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_dvc_yaml_metrics_and_plots():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert spec["metrics"] == ["metrics/summary.json"]
    assert all(Path(p).suffix == ".png" for p in spec["plots"])
    for name, stage in spec["stages"].items():
        assert "metrics" not in stage and "plots" not in stage, name  # wide files: outputs, not metrics
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in spec["stages"].values() for o in s["outs"]}
    for png in spec["plots"]:  # each chart is written by a stage
        assert png.replace("plots/", "${paths.plots}/") in outs, png
    assert {"${paths.metrics}/summary.json": {"cache": False}} in spec["stages"]["summary"]["outs"]


def test_dvc_shows_the_summary_and_renders_plots_offline(tmp_path):
    from PIL import Image

    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    (tmp_path / "plots").mkdir()
    for i, png in enumerate(yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / png)
    _stage_metrics(tmp_path / "metrics")
    write_summary(validate_params({"paths": {"metrics": str(tmp_path / "metrics")}}))
    run = dict(cwd=tmp_path, capture_output=True, text=True, check=True)
    subprocess.run([DVC, "init", "--no-scm", "-q"], **run)
    shown = json.loads(subprocess.run([DVC, "metrics", "show", "--json"], **run).stdout)
    [(_, data)] = shown.items()
    assert list(data["data"]) == ["metrics/summary.json"]
    subprocess.run([DVC, "plots", "show", "-o", "out"], **run)
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img") == 3 and "<script" not in page and "cdn" not in page.lower()
