"""What every stage shares: params, seeds, the MLflow run, metrics/<stage>.json, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from diht_core.config import Params, ParamsError, stage_params
from diht_core.data.files import atomic_write_text, remove_stale_temporaries
from diht_core.data.lock import DataFolderBusy, data_lock
from diht_core.data.synthetic import SourceConflict

from . import INPUTS
from ._cli import BAD_PARAMS_EXIT, add_params_args, fail, params_or_exit
from ._lineage import PROCESS_TAG, process_alive, process_tag, run_tags, session_parent

PARENT_ENV = "DIHT_MLFLOW_PARENT_RUN_ID"
BUSY_EXIT = 75  # EX_TEMPFAIL: try again later
NO_INPUT_EXIT = 66  # EX_NOINPUT: an earlier stage has not run
DATA_CONFLICT_EXIT = 65  # EX_DATAERR: data/raw/train holds the other source's training split
ERROR_TAG = "diht.error"
STATE_DIR = Path(os.environ.get("DIHT_STATE_DIR", ".state"))

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # for processes started from here (read at import)
}


def set_env() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def tracking_uri(params: Params) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a local sqlite store in .state/."""
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri()


def mlflow_state_dir() -> Path:
    """Where the local MLflow store (and the records of session parents) live: STATE_DIR, except under DVC with no
    $DIHT_STATE_DIR, the .state/ of the repository DVC runs for ($DVC_ROOT): a queued experiment runs in a temporary
    copy of the workspace, whose .state/ would be thrown away with its runs."""
    if os.environ.get("DVC_ROOT") and not os.environ.get("DIHT_STATE_DIR") and STATE_DIR == Path(".state"):
        return Path(os.environ["DVC_ROOT"]) / ".state"
    return STATE_DIR


def default_tracking_uri() -> str:
    state = mlflow_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state.resolve() / 'mlflow.db'}"


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on runs, not GenAI traces


def setup_mlflow(params: Params) -> str:
    """Point MLflow at the configured store; return the experiment id (created if missing, marked as one of
    training runs so that MLflow 3's UI opens on its runs)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if exp is None:
        artifacts = None
        if tracking_uri(params) == default_tracking_uri():  # keep local artifacts next to the local store
            artifacts = (mlflow_state_dir().resolve() / "mlartifacts").as_uri()
        try:
            return mlflow.create_experiment(params.mlflow.experiment, artifact_location=artifacts,
                                            tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently
            exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
    [(key, kind)] = EXPERIMENT_KIND.items()
    if exp.tags.get(key) is None or exp.tags[key].endswith("_inferred"):  # unset or only guessed: ours
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, kind)
    end_orphaned_runs(exp.experiment_id)
    return exp.experiment_id


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Runs that a process of this host left RUNNING when it died (kill -9, SIGTERM, a lost terminal) end KILLED,
    with `diht.error` saying which process was gone; returns their ids. Runs of live processes, of other hosts and
    without a process tag are left alone. Every stage and flow calls this when it starts (setup_mlflow)."""
    import mlflow

    client, ended, token = mlflow.MlflowClient(), [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000,
                                  page_token=token)
        for run in page:
            tag = run.data.tags.get(PROCESS_TAG)
            if tag and process_alive(tag) is False:
                client.set_tag(run.info.run_id, ERROR_TAG,
                               f"killed: its process ({tag}) ended without ending the run; found by a later run")
                client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
        token = page.token
        if not token:
            return ended


class StageRun:
    """The MLflow run of one stage: metrics, step series, files."""

    def __init__(self, mlflow_module, name: str, params: Params):
        self.mlflow, self.name, self.params = mlflow_module, name, params

    def log_step(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(mlflow_names({k: float(v) for k, v in metrics.items() if _finite(v)}), step=step)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if Path(path).exists():
            self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def path(self, key: str) -> Path:
        return Path(getattr(self.params.paths, key))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mlflow_names(metrics: dict) -> dict:
    """MLflow metric names allow no '@': recall@1 -> recall_at_1."""
    return {k.replace("@", "_at_"): v for k, v in metrics.items()}


def _flat_metrics(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_metrics(v, key + "/"))
        elif _finite(v):
            out[key] = float(v)
    return out


def write_metrics(params: Params, stage: str, metrics: dict) -> Path:
    path = Path(params.paths.metrics) / f"{stage}.json"
    return atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class MissingInput(FileNotFoundError):
    """A stage's input is not there: an earlier stage has not run."""


def missing_inputs(name: str, params: Params) -> dict[Path, str]:
    """The inputs of stage `name` that are not there -> the stage that writes each."""
    data = Path(params.paths.data)
    inputs = dict(INPUTS.get(name, {}))
    # the shards of train.source: read by recaption when it is enabled, else by train (which then reads recaption's)
    reader = "recaption" if params.recaption.enabled else "train"
    if name == reader:
        inputs.update({"raw/train": "download"} if params.train.source == "raw" else {"filtered": "cat_filter"})
    if name == "train" and params.recaption.enabled:
        inputs[f"recaptioned/{params.train.source}/complete.json"] = "recaption"
    if name == "fewshot" or (name == "benchmark" and any(t.startswith("synthetic_") for t in params.benchmark.tasks)):
        inputs["eval"] = "download"
    paths = {data / rel: producer for rel, producer in inputs.items()}
    if name in ("benchmark", "fewshot") and params.benchmark.checkpoint is None:  # they score the trained model
        paths[Path(params.paths.models) / "model.pt"] = "train"
    return {path: producer for path, producer in paths.items() if not path.exists()}


def check_inputs(name: str, params: Params, earlier: tuple[str, ...] = ()) -> None:
    """Raise MissingInput, naming the stage to run first, when an input of stage `name` is missing (and is not
    written by one of the `earlier` stages of the same run)."""
    for path, producer in missing_inputs(name, params).items():
        if producer not in earlier:
            raise MissingInput(f"stage {name}: its input {path} is missing; run the {producer} stage first "
                               f"(diht stage {producer}, or python -m tasks.{producer})")


def check_run_inputs(stages: list[str], params: Params) -> None:
    """Before a run of `stages` (in pipeline order): MissingInput for the first input that none of them writes."""
    for i, name in enumerate(stages):
        check_inputs(name, params, tuple(stages[:i]))


def run_stage(name: str, body: Callable[[Params, StageRun], dict], params: Params,
              parent_run_id: str | None = None) -> dict:
    """Run one stage inside its MLflow run (nested under the pipeline run when there is one), holding the lock of
    paths.data (diht_core/data/lock.py): a second run of any stage on the same data folder stops at once. A missing
    input stops it before any work (MissingInput). What a killed run's atomic writes left is removed first."""
    with data_lock(params.paths.data, name):
        check_inputs(name, params)
        remove_stale_temporaries(*(getattr(params.paths, k) for k in ("data", "models", "metrics", "plots")),
                                 STATE_DIR / "checkpoints")
        return _run_stage(name, body, params, parent_run_id)


def _run_stage(name: str, body: Callable[[Params, StageRun], dict], params: Params,
               parent_run_id: str | None) -> dict:
    """The stage in its MLflow run, tagged with where it came from (tasks/_lineage.py). Its parent: the flow's run,
    else $DIHT_MLFLOW_PARENT_RUN_ID, else the run shared by the stages of one `dvc repro` / `dvc exp run`. A stage
    that raises ends its run FAILED with the error as the tag `diht.error` (and a session parent with it)."""
    import mlflow

    set_env()
    seed_everything(params.seed)
    experiment_id = setup_mlflow(params)
    session = None
    if not (parent_run_id or os.environ.get(PARENT_ENV)):
        session = session_parent(mlflow_state_dir(), experiment_id, params)
        if session:  # held by this process now (the session's stages run in processes of their own)
            mlflow.MlflowClient().set_tag(session, PROCESS_TAG, process_tag())
            mlflow.MlflowClient().update_run(session, status="RUNNING")
    parent_run_id = parent_run_id or os.environ.get(PARENT_ENV) or session
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent_run_id,
                              nested=mlflow.active_run() is not None,
                              tags={"diht.stage": name, **run_tags(params)}):
            try:
                mlflow.log_params(stage_params(params, name))
                stage = StageRun(mlflow, name, params)
                metrics = body(params, stage)
                path = write_metrics(params, name, metrics)
                mlflow.log_metrics(mlflow_names(_flat_metrics(metrics)))
                mlflow.log_artifact(str(path))
            except BaseException as err:
                mlflow.set_tag(ERROR_TAG, error_line(err))
                raise
        status = "FINISHED"
    finally:
        if session:
            _end_session_stage(session, name, status)
    return metrics


def _end_session_stage(run_id: str, stage: str, status: str) -> None:
    """The session parent after one of its stages: the stages so far in `diht.stages`, ended with its status (the
    next stage sets it running again)."""
    import mlflow

    client = mlflow.MlflowClient()
    done = client.get_run(run_id).data.tags.get("diht.stages")
    client.set_tag(run_id, "diht.stages", f"{done},{stage}" if done else stage)
    if status == "FAILED":
        client.set_tag(run_id, ERROR_TAG, f"stage {stage} failed")
    client.set_terminated(run_id, status)


def error_line(err: BaseException) -> str:
    """`<ExceptionType>: <message>` on one line."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}"[:4000]


def cli(name: str, body: Callable[[Params, StageRun], dict], argv: list[str] | None = None) -> None:
    """`python -m tasks.<stage> [--params FILE] [--set KEY=VALUE ...]`; exit code 2: bad params, BUSY_EXIT: the
    data folder is in use by another run, NO_INPUT_EXIT: an input is missing (the message names the stage to run
    first)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=f"Run the {name} stage.")
    add_params_args(parser)
    stage_cli(name, body, parser.parse_args(argv))


def stage_cli(name: str, body: Callable[[Params, StageRun], dict], args: argparse.Namespace) -> None:
    """Run stage `name` from parsed --params/--set (`python -m tasks.<stage>`, `diht stage <stage>`); print its
    metrics."""
    set_env()
    params = params_or_exit(args)
    with exit_codes():
        metrics = run_stage(name, body, params)
    print(json.dumps(_flat_metrics(metrics), indent=1)[:2000])


USER_ERRORS = ((DataFolderBusy, BUSY_EXIT), (MissingInput, NO_INPUT_EXIT), (SourceConflict, DATA_CONFLICT_EXIT),
               (ParamsError, BAD_PARAMS_EXIT), (FileNotFoundError, NO_INPUT_EXIT))  # first match wins
TRACEBACK_ENV = "DIHT_TRACEBACK"  # 1: a user error shows its traceback too


@contextmanager
def exit_codes():
    """A stage that fails on a user error ends the command in one line, `error: <message>`, with an exit code that
    says which: BUSY_EXIT (the data folder is in use by another run), NO_INPUT_EXIT (an input or a given file is
    missing), DATA_CONFLICT_EXIT (data/raw/train holds the other source's data), BAD_PARAMS_EXIT (params refused
    by a stage). Other errors keep their traceback; $DIHT_TRACEBACK=1 keeps it for user errors too."""
    try:
        yield
    except tuple(e for e, _ in USER_ERRORS) as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        fail(err, next(code for e, code in USER_ERRORS if isinstance(err, e)))


def make_task(name: str, body: Callable[[Params, StageRun], dict]):
    """The Prefect task of a stage: the validated params in (validated once, by the flow), the stage's metrics out."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    @task(name=name, cache_policy=NO_CACHE)
    def _task(params: Params, parent_run_id: str | None = None) -> dict:
        return run_stage(name, body, params, parent_run_id)

    return _task
