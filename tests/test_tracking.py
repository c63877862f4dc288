"""MLflow runs that say where they came from (tasks/_lineage.py, tasks/_stage.py): git revision and dirty flag,
params digest, DVC experiment, one parent per `dvc repro` / `dvc exp run`; the experiment opens on training runs; a
stage failing on a user error ends FAILED with the error as a tag and one line on stderr."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from diht_core.config import load_params, validate_params
from tasks import _lineage, _stage

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
DVC_VARS = ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT", _lineage.SESSION_ENV,
            _stage.PARENT_ENV)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created once (its schema takes seconds), copied by each test."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path, monkeypatch, empty_store):
    """A tmp folder with a params file and a fresh sqlite MLflow store, outside any DVC command."""
    import mlflow

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in DVC_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_stage, "STATE_DIR", tmp_path / ".state")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"paths": {k: str(tmp_path / k) for k in ("data", "models", "metrics", "plots")},
              "mlflow": {"tracking_uri": uri, "experiment": "lineage"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _runs(project: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["lineage"], output_format="list")


def _ok(params, run) -> dict:
    return {"value": 1.0}


def test_params_digest_follows_what_changes_results():
    base = validate_params({})
    assert _lineage.params_digest(base) == _lineage.params_digest(validate_params({}))
    assert _lineage.params_digest(base) != _lineage.params_digest(validate_params({"train": {"steps": 20}}))
    assert _lineage.params_digest(base) == _lineage.params_digest(
        validate_params({"mlflow": {"set_alias": True, "experiment": "other"}}))  # where runs go, not what they are


def test_git_tags_commit_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _lineage.git_tags() == {}  # not a git repository
    subprocess.run(["git", "init", "-q"], check=True)
    for f in ("params.yaml", "metrics/train.json", "dvc.lock"):
        Path(f).parent.mkdir(exist_ok=True)
        Path(f).write_text("a: 1\n")
    subprocess.run(GIT + ["add", "-A"], check=True)
    subprocess.run(GIT + ["commit", "-qm", "x"], check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _lineage.git_tags(("metrics",)) == {_lineage.GIT_COMMIT: rev, _lineage.GIT_DIRTY: "false"}
    Path("metrics/train.json").write_text("a: 2\n")  # outputs of the pipeline do not make it dirty
    Path("dvc.lock").write_text("a: 2\n")
    Path("untracked.txt").write_text("x")
    assert _lineage.git_tags(("metrics",))[_lineage.GIT_DIRTY] == "false"
    Path("params.yaml").write_text("a: 2\n")
    assert _lineage.git_tags(("metrics",))[_lineage.GIT_DIRTY] == "true"


def test_stage_run_carries_lineage_and_experiment_opens_on_runs(project, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_STAGE", "download")  # under DVC, in an experiment
    monkeypatch.setenv("DVC_EXP_NAME", "wiser-gins")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd" * 5)
    params = load_params(project / "params.yaml")
    _stage.run_stage("download", _ok, params)
    [child, parent] = sorted(_runs(project), key=lambda r: "mlflow.parentRunId" in r.data.tags, reverse=True)
    tags = child.data.tags
    assert tags[_lineage.PARAMS_DIGEST] == _lineage.params_digest(params)
    assert tags["diht.dvc.exp_name"] == "wiser-gins" and tags["diht.dvc.stage"] == "download"
    assert tags["diht.dvc.baseline_rev"] == "0123abcd" * 5
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name == "dvc exp wiser-gins" and parent.info.status == "FINISHED"
    assert parent.data.tags["diht.stages"] == "download" and "diht.dvc.stage" not in parent.data.tags
    exp = mlflow.get_experiment_by_name("lineage")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_whose_process_was_killed_ends_killed_when_the_next_run_starts(project):
    """kill -9 leaves a stage's MLflow run RUNNING; the next stage or flow that starts ends it KILLED with the reason.
    Runs of live processes (this one) and of other hosts stay as they are."""
    import mlflow

    script = (f"import pathlib, sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "from diht_core.config import load_params\nfrom tasks import _stage\n"
              "_stage.STATE_DIR = pathlib.Path('.state')\n"
              "def body(params, run):\n    pathlib.Path('started').write_text('x')\n    time.sleep(600)\n"
              "_stage.run_stage('download', body, load_params('params.yaml'))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=project)
    try:
        for _ in range(1200):
            if (project / "started").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (project / "started").exists(), f"the stage did not start (rc {proc.poll()})"
    finally:
        proc.kill()
        proc.wait()
    [killed] = _runs(project)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves
    client = mlflow.MlflowClient()
    exp_id = killed.info.experiment_id
    elsewhere = client.create_run(exp_id, tags={_lineage.PROCESS_TAG: "another-host:1:1.000"}).info.run_id
    live = client.create_run(exp_id, tags={_lineage.PROCESS_TAG: _lineage.process_tag()}).info.run_id
    _stage.run_stage("download", _ok, load_params(project / "params.yaml"))
    status = {r.info.run_id: (r.info.status, r.data.tags.get(_stage.ERROR_TAG)) for r in _runs(project)}
    assert status[killed.info.run_id][0] == "KILLED"
    assert status[killed.info.run_id][1].startswith(f"killed: its process ({killed.data.tags[_lineage.PROCESS_TAG]})")
    assert status[elsewhere] == ("RUNNING", None) and status[live] == ("RUNNING", None)
    assert sorted(s for s, _ in status.values()) == ["FINISHED", "KILLED", "RUNNING", "RUNNING"]
    assert _lineage.process_alive(f"{socket.gethostname()}:{proc.pid}:1.000") is False
    assert _lineage.process_alive(f"{socket.gethostname()}:{os.getpid()}:1.000") is False  # pid reused: not ours
    me = _lineage.process_tag()
    host, pid, started = me.rsplit(":", 2)
    assert _lineage.process_alive(f"{host}:{pid}:{float(started) + 1:.3f}") is True  # a clock step of 1 s


def test_experiment_kind_set_on_an_existing_experiment_unless_chosen(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    exp_id = mlflow.create_experiment("lineage")
    params = load_params(project / "params.yaml")
    assert _stage.setup_mlflow(params) == exp_id
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.MlflowClient().set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")  # a user's choice
    _stage.setup_mlflow(params)
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"


def test_stages_of_one_session_share_a_parent_another_session_gets_its_own(project, monkeypatch):
    params = load_params(project / "params.yaml")
    monkeypatch.setenv(_lineage.SESSION_ENV, "one")
    _stage.run_stage("download", _ok, params)
    _stage.run_stage("recaption", _ok, params)
    monkeypatch.setenv(_lineage.SESSION_ENV, "two")
    _stage.run_stage("download", _ok, params)
    runs = _runs(project)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    by_parent = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            by_parent.setdefault(r.data.tags["mlflow.parentRunId"], []).append(r.data.tags["diht.stage"])
    assert sorted(map(sorted, by_parent.values())) == [["download"], ["download", "recaption"]]
    assert {p.data.tags["diht.stages"] for p in parents.values()} == {"download,recaption", "download"}
    assert all(p.info.status == "FINISHED" for p in parents.values())


def test_session_key_is_the_dvc_process_above(tmp_path):
    """A command DVC runs (through its shell) finds the `dvc` process above it: two commands of one DVC process
    share the key, another DVC process has another."""
    fake = tmp_path / "dvc"  # stands in for the dvc executable: runs two stage commands through a shell
    probe = f"{sys.executable} -c 'from tasks._lineage import session_key; print(session_key())'"
    fake.write_text(f"#!/bin/sh\nsh -c \"{probe}\"\n{probe}\n")
    fake.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k not in DVC_VARS}, "DVC_STAGE": "x", "PYTHONPATH": str(ROOT)}
    first = subprocess.run([str(fake)], env=env, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake)], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-"), first
    assert second[0] == second[1] and second[0] != first[0]
    env.pop("DVC_STAGE")  # not under DVC: no session
    assert subprocess.run([str(fake)], env=env, capture_output=True, text=True).stdout.split() == ["None", "None"]


def test_user_error_fails_the_run_with_a_tag_and_one_line(project, capsys):
    def missing_checkpoint(params, run):
        raise FileNotFoundError("models/elsewhere.pt not found")

    with pytest.raises(SystemExit) as exc:
        _stage.cli("download", missing_checkpoint, ["--params", str(project / "params.yaml")])
    assert exc.value.code == _stage.NO_INPUT_EXIT
    err = capsys.readouterr().err  # (MLflow's own log lines may come first: its store is created)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: models/elsewhere.pt not found"
    [run] = _runs(project)
    assert run.info.status == "FAILED"
    assert run.data.tags["diht.error"] == "FileNotFoundError: models/elsewhere.pt not found"
    assert _lineage.PARAMS_DIGEST in run.data.tags


def test_a_bug_keeps_its_traceback_and_the_session_parent_fails(project, monkeypatch):
    def bug(params, run):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setenv(_lineage.SESSION_ENV, "s")
    with pytest.raises(ZeroDivisionError):
        _stage.cli("download", bug, ["--params", str(project / "params.yaml")])
    runs = _runs(project)
    [child] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert child.info.status == parent.info.status == "FAILED"
    assert child.data.tags["diht.error"] == "ZeroDivisionError: division by zero"
    assert parent.data.tags["diht.error"] == "stage download failed"


@pytest.mark.parametrize("error, code", [("DataFolderBusy", 75), ("SourceConflict", 65), ("ParamsError", 2)])
def test_user_errors_exit_codes(error, code, capsys, monkeypatch):
    from diht_core.config import ParamsError
    from diht_core.data.lock import DataFolderBusy
    from diht_core.data.synthetic import SourceConflict

    cls = {"DataFolderBusy": DataFolderBusy, "SourceConflict": SourceConflict, "ParamsError": ParamsError}[error]
    with pytest.raises(SystemExit) as exc, _stage.exit_codes():
        raise cls("what went wrong")
    assert exc.value.code == code and capsys.readouterr().err == "error: what went wrong\n"
    monkeypatch.setenv(_stage.TRACEBACK_ENV, "1")
    with pytest.raises(cls), _stage.exit_codes():
        raise cls("what went wrong")


def test_queued_experiment_logs_to_the_repository_store(tmp_path, monkeypatch):
    """A queued `dvc exp run` runs in a temporary copy of the workspace: its runs go to the store of the repository
    ($DVC_ROOT/.state), not to the copy's, which DVC deletes."""
    monkeypatch.setattr(_stage, "STATE_DIR", Path(".state"))
    monkeypatch.delenv("DIHT_STATE_DIR", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert _stage.mlflow_state_dir() == Path(".state")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert _stage.mlflow_state_dir() == tmp_path / "repo" / ".state"
    monkeypatch.setenv("DIHT_STATE_DIR", str(tmp_path / "mine"))  # chosen by hand: kept
    assert _stage.mlflow_state_dir() == Path(".state")
