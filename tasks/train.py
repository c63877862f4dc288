"""Stage `train`: an open_clip model trained with InfoNCE, HN-NCE or FFF's sigmoid loss (+ concept distillation),
in this process or on torchrun ranks (`train.launcher`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from diht_core.launch import launch_torchrun, launched_by_torchrun
from diht_core.train.run import fit

from ._ranks import rank_args, write_result
from ._registry import register_trained_model
from ._stage import STATE_DIR, cli, make_task, mlflow_names, run_stage

RUN_ENV = "DIHT_MLFLOW_RUN_ID"  # the stage's MLflow run, which rank 0 of a torchrun launch logs into
CHECKPOINTS = STATE_DIR / "checkpoints" / "train"


def body(p, run) -> dict:
    if p.train.launcher == "torchrun" and not launched_by_torchrun():
        env = {RUN_ENV: run.mlflow.active_run().info.run_id, "MLFLOW_TRACKING_URI": run.mlflow.get_tracking_uri()}
        metrics = launch_torchrun(p, "tasks.train", p.train.nproc_per_node, STATE_DIR / "torchrun", env)
    else:
        metrics = fit(p, CHECKPOINTS, run.log_step)
    if metrics:
        run.log_artifact(Path(p.paths.plots) / "train_loss.png", "plots")
    register_trained_model(p, Path(p.paths.models))  # a new version of diht-<train.model> (tasks/_registry.py)
    return metrics


def _mlflow_logger(run_id: str):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()

    def log(step: int, rec: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in mlflow_names(rec).items()])
    return log


train_task = make_task("train", body)


def main() -> None:
    """`python -m tasks.train [--params FILE] [--set KEY=VALUE ...]`, also under torchrun (every rank runs it; rank 0
    owns the MLflow run and the outputs). `--overrides` and `--result` are how `train.launcher: torchrun` passes the
    stage's params on and gets rank 0's metrics back."""
    if not launched_by_torchrun():
        return cli("train", body)
    p, result = rank_args("train")
    rank = int(os.environ["RANK"])
    if result is None and rank == 0:  # torchrun launched by hand (multi-node): rank 0 runs the stage
        run_stage("train", body, p)
        return
    log_fn = _mlflow_logger(os.environ[RUN_ENV]) if rank == 0 and os.environ.get(RUN_ENV) else None
    write_result(result, fit(p, CHECKPOINTS, log_fn))


if __name__ == "__main__":
    main()
