"""The committed baseline (dvc.lock and metrics/ of the committed params.yaml, from `make demo`) is reproduced: the
cheap deterministic stages download -> cat_filter -> concepts, run by `dvc repro` in a copy of the project, give
the output hashes of the committed dvc.lock and the committed metrics files bit for bit. (`make check-baseline`
runs the whole demo and compares everything.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, project_env

pytestmark = pytest.mark.slow
STAGES = ("download", "cat_filter", "concepts")
DVC = str(Path(sys.executable).parent / "dvc")


def _committed(path: str) -> str | None:
    """The file as committed at HEAD (None when it is not in git)."""
    res = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def _outs(lock: dict, stage: str) -> dict:
    return {o["path"]: o.get("md5") for o in lock["stages"][stage]["outs"]}


def test_cheap_stages_reproduce_the_committed_baseline(tmp_path):
    files = {p: _committed(p) for p in ("dvc.lock", "params.yaml", *(f"metrics/{s}.json" for s in STAGES))}
    missing = [p for p, text in files.items() if text is None]
    if missing:
        pytest.skip(f"no committed baseline yet: {', '.join(missing)} not in git (make demo, then commit dvc.lock "
                    f"and metrics/)")
    for name in ("diht_core", "tasks", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for name in ("params.yaml", "dvc.lock"):
        (tmp_path / name).write_text(files[name])
    (tmp_path / ".state" / "prefect").mkdir(parents=True)
    env = project_env(tmp_path)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    res = subprocess.run([DVC, "repro", "-q", STAGES[-1]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    committed = yaml.safe_load(files["dvc.lock"])
    reproduced = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    for stage in STAGES:
        assert _outs(reproduced, stage) == _outs(committed, stage), f"stage {stage}: outputs differ from dvc.lock"
        got = json.loads((tmp_path / "metrics" / f"{stage}.json").read_text())
        assert got == json.loads(files[f"metrics/{stage}.json"]), f"metrics/{stage}.json differs from the commit"
