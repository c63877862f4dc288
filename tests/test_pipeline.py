"""End to end: the Prefect flow (ephemeral), `dvc repro`, the served deployment `diht/full`, a worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, project_env
from test_open_clip_dir import assert_open_clip_alone_gives_ours, write_images
from tasks import STAGES

pytestmark = pytest.mark.slow
PY = sys.executable
BIN = Path(PY).parent


FLOW_STAGES = tuple(s for s in STAGES if s != "recaption")  # recaption is off in the tiny params: the flow skips it


def _metrics(project: Path) -> dict:
    return {s: json.loads((project / "metrics" / f"{s}.json").read_text()) for s in FLOW_STAGES}


def _tree(project: Path, *dirs: str) -> dict:
    """relative path -> sha256 of every file under dirs (the stages' lock file is no output)."""
    import hashlib

    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest()
            for d in dirs for f in sorted((project / d).rglob("*")) if f.is_file() and f.name != ".diht.lock"}


def _run(cmd, project, timeout=600, env=None):
    res = subprocess.run(cmd, cwd=project, env=env or project_env(project), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def test_flow_then_dvc_repro_give_the_same_metrics(tiny_project):
    _run([PY, "-m", "flows.cli", "run", "--params", "params.yaml"], tiny_project)
    flow_metrics = _metrics(tiny_project)
    assert not (tiny_project / "metrics" / "recaption.json").exists()
    for stage in FLOW_STAGES:
        assert flow_metrics[stage], stage
    bench = flow_metrics["benchmark"]["tasks"]
    assert set(bench) == {"synthetic_shape", "synthetic_colour", "synthetic_count", "synthetic_retrieval",
                          "synthetic_vqa", "synthetic_compositional"}
    assert all("main" in r and "chance" in r for r in bench.values())
    # the trained model loads with open_clip alone (open_clip's local-dir layout beside model.pt)
    write_images(tiny_project)
    assert_open_clip_alone_gives_ours(tiny_project, "models")

    # MLflow: one parent run and 8 nested stage runs, each with metrics
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / '.state' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    assert sorted(r.data.tags["diht.stage"] for r in children) == sorted(FLOW_STAGES)
    assert all(r.data.metrics for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    # the trained model is a version of the registered model diht-tiny-vit, logged by the train run
    client = mlflow.MlflowClient()
    [version] = client.search_model_versions("name='diht-tiny-vit'")
    train_run = next(r for r in children if r.data.tags["diht.stage"] == "train")
    assert version.run_id == train_run.info.run_id and version.status == "READY"

    # dvc repro runs the same stages from params.yaml and reproduces the same metrics
    env = project_env(tiny_project)
    _run([str(BIN / "dvc"), "init", "--no-scm", "-q"], tiny_project, env=env)
    _run([str(BIN / "dvc"), "repro", "-q"], tiny_project, env=env)
    assert _metrics(tiny_project) == flow_metrics
    assert json.loads((tiny_project / "metrics" / "recaption.json").read_text()) == {"enabled": False}  # a no-op
    assert (tiny_project / "dvc.lock").exists()
    # and now nothing is left to rerun
    status = _run([str(BIN / "dvc"), "status", "--json"], tiny_project, env=env)
    assert json.loads(status.stdout or "{}") == {}
    assert len(client.search_model_versions("name='diht-tiny-vit'")) == 2  # dvc repro trained (and registered) again
    assert client.get_registered_model("diht-tiny-vit").aliases == {}  # mlflow.set_alias is false: no @champion
    # the stage runs of `dvc repro` share one parent; every run carries the params digest; the summary is written
    runs = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    [dvc_parent] = [r for r in runs if r.data.tags.get("diht.pipeline") == "dvc"]
    dvc_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dvc_parent.info.run_id]
    assert sorted(r.data.tags["diht.stage"] for r in dvc_children) == sorted(STAGES)
    assert dvc_parent.info.run_name == "dvc repro" and dvc_parent.info.status == "FINISHED"
    assert len({r.data.tags["diht.params_digest"] for r in runs}) == 1
    summary = json.loads((tiny_project / "metrics" / "summary.json").read_text())
    assert summary["benchmark"]["mean_main"] == flow_metrics["benchmark"]["mean_main"]
    assert summary["cat_filter"]["kept_fraction"] == flow_metrics["cat_filter"]["kept_fraction"]

    # the committed default remote (.state/dvc-remote): push, lose the cache and the outputs, pull them back
    from configobj import ConfigObj  # DVC's config format

    dvc_config = ConfigObj(str(tiny_project / ".dvc" / "config"))
    dvc_config.merge(ConfigObj(str(ROOT / ".dvc" / "config")))
    dvc_config.write()
    before = _tree(tiny_project, "data", "models", "plots")
    _run([str(BIN / "dvc"), "push", "-q"], tiny_project, env=env)
    assert any((tiny_project / ".state" / "dvc-remote").rglob("*"))
    for d in ("data", "models", ".dvc/cache"):
        shutil.rmtree(tiny_project / d)
    for png in (tiny_project / "plots").glob("*.png"):
        png.unlink()
    _run([str(BIN / "dvc"), "pull", "-q"], tiny_project, env=env)
    assert _tree(tiny_project, "data", "models", "plots") == before
    status = _run([str(BIN / "dvc"), "status", "--json"], tiny_project, env=env)
    assert json.loads(status.stdout or "{}") == {}


def test_invalid_params_fail_before_any_work(tiny_project):
    (tiny_project / "params.yaml").write_text("train:\n  steps: -1\n")
    res = subprocess.run([PY, "-m", "flows.cli", "run", "--params", "params.yaml"], cwd=tiny_project,
                         env=project_env(tiny_project), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "train.steps" in res.stderr
    assert not (tiny_project / "data").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_served_deployment_runs_the_pipeline(tiny_project):
    port = _free_port()
    env = project_env(tiny_project)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    log = open(tiny_project / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tiny_project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    served = None
    try:
        _wait_health(f"http://127.0.0.1:{port}/api/health")
        served = subprocess.Popen([PY, "-m", "flows.cli", "serve", "--params", "params.yaml"], cwd=tiny_project,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while True:  # the deployment exists once `serve` has registered it
            res = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "diht/full"], cwd=tiny_project,
                                 env=env, capture_output=True, text=True)
            if res.returncode == 0:
                break
            assert time.time() < deadline, res.stdout + res.stderr
            time.sleep(2)
        res = _run([str(BIN / "prefect"), "deployment", "run", "diht/full", "--watch", "--watch-timeout", "400"],
                   tiny_project, timeout=450, env=env)
        assert "COMPLETED" in (res.stdout + res.stderr).upper()
        for stage in FLOW_STAGES:
            assert (tiny_project / "metrics" / f"{stage}.json").exists(), stage
        # eval-only reruns just the benchmark and the few-shot probe on the trained model
        before = (tiny_project / "metrics" / "train.json").stat().st_mtime
        (tiny_project / "metrics" / "benchmark.json").unlink()
        res = _run([str(BIN / "prefect"), "deployment", "run", "diht/eval-only", "--watch", "--watch-timeout", "300"],
                   tiny_project, timeout=350, env=env)
        assert "COMPLETED" in (res.stdout + res.stderr).upper()
        assert (tiny_project / "metrics" / "benchmark.json").exists()
        assert (tiny_project / "metrics" / "train.json").stat().st_mtime == before
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
        log.close()
    assert server.poll() is not None


def test_worker_runs_the_deployments_of_prefect_yaml(tiny_project):
    """prefect.yaml's deployments, deployed to the process pool diht-local and run by a worker."""
    shutil.copy(ROOT / "prefect.yaml", tiny_project / "prefect.yaml")
    port = _free_port()
    env = project_env(tiny_project)
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", DIHT_PROJECT_DIR=str(tiny_project))
    prefect = str(BIN / "prefect")
    log = open(tiny_project / "server.log", "w")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tiny_project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_health(f"http://127.0.0.1:{port}/api/health")
        _run([prefect, "work-pool", "create", "diht-local", "--type", "process", "--overwrite"], tiny_project, env=env)
        _run([prefect, "--no-prompt", "deploy", "--all"], tiny_project, env=env)
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "diht-local"], cwd=tiny_project, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        res = _run([prefect, "deployment", "run", "diht/filter-only", "--watch", "--watch-timeout", "300"],
                   tiny_project, timeout=350, env=env)
        assert "COMPLETED" in (res.stdout + res.stderr).upper()
        ran = {p.stem for p in (tiny_project / "metrics").glob("*.json")}
        assert ran == {"download", "cat_filter", "summary"}  # summary.json: the headline numbers of every run
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
        log.close()
    assert server.poll() is not None and worker.poll() is not None
