"""Shared fixtures. Every test runs offline with analytics off and Prefect/MLflow state in tmp dirs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny_params.yaml"

os.environ.update({
    "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # Prefect's 20 s is short on a busy 2-core machine
})
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` (pytest-xdist): set before torch and Prefect are imported
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one thread a worker: OpenMP threads
        os.environ.setdefault(var, "1")  # spin-wait, and two workers of two threads each on 2 cores slow each other
    _home = Path(os.environ.get("PREFECT_HOME", ROOT / ".state" / "prefect")) / os.environ["PYTEST_XDIST_WORKER"]
    _home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(_home)  # an ephemeral Prefect server and database a worker


def tiny_params() -> dict:
    """The project's params.yaml with the tiny overrides applied (dvc.yaml needs every key present)."""
    from diht_core.config import deep_merge

    return deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A copy of the project's pipeline files with the tiny params, in a fresh directory."""
    for name in ("diht_core", "tasks", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (tmp_path / ".state" / "prefect").mkdir(parents=True)
    return tmp_path


def project_env(project: Path) -> dict:
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(project / ".state" / "prefect"), "DIHT_STATE_DIR": str(project / ".state"),
                "PYTHONPATH": str(project), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end (slow) tests first, in their order: under `make test`'s --dist loadfile the long files
    start first and the short ones fill in, so no worker is left alone with a long file at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
