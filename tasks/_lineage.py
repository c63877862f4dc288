"""Where an MLflow run came from: the git revision (and whether the code or params differ from it), the params
digest, the DVC experiment; and the parent run that groups the stage runs of one `dvc repro` / `dvc exp run`."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

from diht_core.config import Params
from diht_core.data.files import atomic_write_text

GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it as the run's source version
GIT_DIRTY = "diht.git.dirty"
PARAMS_DIGEST = "diht.params_digest"
DVC_TAGS = {"DVC_EXP_NAME": "diht.dvc.exp_name", "DVC_EXP_BASELINE_REV": "diht.dvc.baseline_rev",
            "DVC_STAGE": "diht.dvc.stage"}  # environment variables DVC sets for a stage's command -> tag
SESSION_ENV = "DIHT_MLFLOW_SESSION"  # set by hand: stage runs of one session share a parent, DVC or not
PROCESS_TAG = "diht.process"  # <host>:<pid>:<start time> of the process that holds the run open


def params_digest(params: Params) -> str:
    """sha256 (16 hex digits) of the validated params, the `mlflow` section left out (it says where runs go and
    which alias to set, not what they compute): equal digests, equal results."""
    dump = {k: v for k, v in params.model_dump().items() if k != "mlflow"}
    return hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_tags(outputs: tuple[str, ...] = ()) -> dict[str, str]:
    """The commit checked out here and `diht.git.dirty`: "true" when a tracked file other than the pipeline's own
    outputs (`outputs`, dvc.lock) differs from it; {} outside a git repository."""
    rev = _git("rev-parse", "HEAD")
    if not rev:
        return {}
    excluded = [f":(exclude){p}" for p in (*outputs, "dvc.lock")]
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {GIT_COMMIT: rev, GIT_DIRTY: "unknown" if changed is None else str(bool(changed)).lower()}


def process_tag() -> str:
    """This process as <host>:<pid>:<start time> (the start time tells a reused pid apart)."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


def process_alive(tag: str) -> bool | None:
    """Whether the process a PROCESS_TAG names still runs; None when that is unknown here (another host, or no
    permission to see it). The start time may differ by up to 2 s: psutil derives it from the boot time, which a
    clock step moves, and a live run must never be taken for a dead one."""
    import psutil

    try:
        host, pid, started = tag.rsplit(":", 2)
        pid, started = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 2.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.Error:  # AccessDenied (e.g. /proc mounted with hidepid): unknown, left alone
        return None


def run_tags(params: Params) -> dict[str, str]:
    """The tags every run of ours carries: git revision and dirty flag, params digest, DVC experiment and stage,
    the process that runs it."""
    tags = git_tags((params.paths.metrics, params.paths.plots))
    tags[PARAMS_DIGEST] = params_digest(params)
    tags[PROCESS_TAG] = process_tag()
    tags.update({tag: os.environ[var] for var, tag in DVC_TAGS.items() if os.environ.get(var)})
    return tags


def _is_dvc(cmdline: list[str]) -> bool:
    head = cmdline[:3]
    return any(Path(a).name in ("dvc", "dvc.exe") for a in head) or ("-m" in head and "dvc" in cmdline[:4])


def session_key() -> str | None:
    """What groups stage runs under one parent: $DIHT_MLFLOW_SESSION, else, for a command DVC runs ($DVC_STAGE is
    set), the DVC process it runs under (`dvc repro`, `dvc exp run`, a queued experiment's `dvc exp exec-run`) as
    <pid>-<start time>, which no other DVC command shares; None otherwise (a stage run by hand)."""
    if os.environ.get(SESSION_ENV):
        return os.environ[SESSION_ENV]
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            if _is_dvc(proc.cmdline()):
                return f"dvc-{proc.pid}-{int(proc.create_time() * 1000)}"
            proc = proc.parent()
    except psutil.Error:
        pass
    exp = os.environ.get("DVC_EXP_NAME")  # no DVC process found: at least the stages of one experiment
    return f"dvc-exp-{os.environ.get('DVC_EXP_BASELINE_REV', '')[:12]}-{exp}" if exp else None


def _session_alive(key: str) -> bool:
    import psutil

    parts = key.split("-")
    if len(parts) != 3 or parts[0] != "dvc" or not parts[1].isdigit():
        return True  # not ours to judge ($DIHT_MLFLOW_SESSION, experiment names)
    try:
        return int(psutil.Process(int(parts[1])).create_time() * 1000) == int(parts[2])
    except (psutil.Error, ValueError):
        return False


def session_parent(state_dir: Path, experiment_id: str, params: Params) -> str | None:
    """The parent run of this stage's session (session_key), created by the session's first stage and recorded in
    <state_dir>/mlflow-sessions/ under a file lock (stages of one DVC command run one after another, queued
    experiments in parallel: each has its own key); None outside a session. Records of DVC processes that ended
    are removed."""
    import mlflow

    key = session_key()
    if key is None:
        return None
    folder = state_dir / "mlflow-sessions"
    folder.mkdir(parents=True, exist_ok=True)
    uri = mlflow.get_tracking_uri()
    store = hashlib.sha256(f"{uri}\n{experiment_id}".encode()).hexdigest()[:8]
    record = folder / f"{key}.{store}.json"
    client = mlflow.MlflowClient()
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            run_id = json.loads(record.read_text())["run_id"]
            try:
                client.get_run(run_id)
                return run_id
            except mlflow.exceptions.MlflowException:  # the store was reset: start a new parent
                pass
        for old in folder.glob("*.json"):
            if not _session_alive(old.name.split(".")[0]):
                old.unlink(missing_ok=True)
        exp = os.environ.get("DVC_EXP_NAME")
        name = f"dvc exp {exp}" if exp else ("dvc repro" if key.startswith("dvc-") else f"session {key}")
        run = client.create_run(experiment_id, run_name=name,
                                tags={"diht.pipeline": "dvc" if key.startswith("dvc-") else "session",
                                      "diht.session": key,
                                      **{k: v for k, v in run_tags(params).items() if k != DVC_TAGS["DVC_STAGE"]}})
        atomic_write_text(record, json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
        return run.info.run_id
