"""The Prefect flow `diht`: every stage, in order, under one MLflow parent run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from diht_core.config import Params, deep_merge, load_params
from diht_core.models import check_names
from flows.ablation import ablation as ablation_flow
from flows.stages import TASKS
from tasks import STAGES
from tasks._lineage import run_tags
from tasks._stage import ERROR_TAG, check_run_inputs, error_line, mlflow_names, set_env, setup_mlflow, tracking_uri
from tasks.summary import write_summary


DEPLOYMENTS = {  # name -> the stages it runs (served by --serve; declared for workers in prefect.yaml)
    "full": list(STAGES),
    "filter-only": ["download", "cat_filter"],
    "eval-only": ["benchmark", "fewshot"],
    "ablation": None,  # the ablation grid (flows/ablation.py): upstream stages once, then train + benchmark runs
}


def deployment_parameters(name: str, params_path: str = "params.yaml") -> dict:
    """The flow parameters of deployment `name` (`full` runs every stage, present and future)."""
    if name == "ablation":
        return {"params_path": params_path, "ablation": True}
    if name == "full":  # the full pipeline's model becomes @<mlflow.alias> in the registry
        return {"params_path": params_path, "stages": None, "overrides": {"mlflow": {"set_alias": True}}}
    return {"params_path": params_path, "stages": DEPLOYMENTS[name]}


@flow(name="diht", log_prints=True)
def diht(params_path: str = "params.yaml", overrides: dict | None = None, workdir: str | None = None,
         stages: list[str] | None = None, ablation: bool = False, quick: bool = False) -> dict:
    """download -> cat_filter -> [recaption] -> concepts -> teacher -> pseudo_labels -> train -> benchmark -> fewshot.

    stages: run only these (in pipeline order), on the files the earlier stages left.
    ablation: run the ablation grid of params.yaml's `ablation` instead (the flow `ablation`; quick: its tiny CI
    variant).
    """
    if workdir:
        os.chdir(workdir)
    set_env()
    if ablation:
        report = ablation_flow(params_path, overrides, quick)
        return {"parent_run_id": report["parent_run_id"], "table": report["table"],
                "mean_main": {c: r["mean_main"]["mean"] for c, r in report["arms"].items()}}
    params = load_params(params_path, overrides)  # validated before any work starts
    check_names(params)
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    run_stages = [s for s in STAGES if (stages is None or s in stages)
                  and (s != "recaption" or params.recaption.enabled)]  # pseudo-captions only when enabled
    check_run_inputs(run_stages, params)  # an input no stage of this run writes: stop before any work
    logger = get_run_logger()
    experiment_id = setup_mlflow(params)
    results = {}
    with mlflow.start_run(experiment_id=experiment_id, run_name="diht-pipeline",
                          tags={"diht.pipeline": "full", **run_tags(params)}) as parent:
        mlflow.log_param("params_path", params_path)
        mlflow.log_dict(params.model_dump(), "params.json")
        mlflow.set_tag("diht.stages", ",".join(run_stages))
        for name in run_stages:
            logger.info("stage %s", name)
            try:
                results[name] = TASKS[name](params, parent.info.run_id)
            except BaseException as err:  # the pipeline run ends FAILED too, saying which stage and why
                mlflow.set_tag(ERROR_TAG, f"stage {name}: {error_line(err)}")
                raise
        if "benchmark" in results:
            headline = {f"{t}/{k}": v for t, r in results["benchmark"]["tasks"].items() for k, v in r.items()
                        if k in ("main", "chance")}
            mlflow.log_metrics(mlflow_names({k: float(v) for k, v in headline.items()}))
            mlflow.log_metric("benchmark_mean_main", results["benchmark"]["mean_main"])
    write_summary(params)  # metrics/summary.json: the headline numbers (= the DVC stage `summary`)
    print(f"metrics in {Path(params.paths.metrics).resolve()}/; MLflow store {tracking_uri(params)}")
    out = {"parent_run_id": parent.info.run_id, "stages": run_stages}
    if "benchmark" in results:
        out["benchmark"] = {t: r.get("main") for t, r in results["benchmark"]["tasks"].items()}
    return out


def summary(params: Params) -> str:
    """A markdown table of the benchmark's main metrics against chance, from metrics/benchmark.json."""
    from diht_core.eval.report import markdown_table

    return markdown_table(json.loads((Path(params.paths.metrics) / "benchmark.json").read_text())["tasks"])


def serve(params_path: str = "params.yaml", overrides: dict | None = None) -> None:
    """Serve the deployments of DEPLOYMENTS from this process, run in this folder (needs a Prefect server)."""
    from prefect import serve as prefect_serve

    def parameters(name: str) -> dict:
        out = {**deployment_parameters(name, params_path), "workdir": os.getcwd()}
        if overrides:
            out["overrides"] = deep_merge(out.get("overrides", {}), overrides)
        return out

    prefect_serve(*[diht.to_deployment(name, parameters=parameters(name)) for name in DEPLOYMENTS])


if __name__ == "__main__":  # the command line is `diht` (flows/cli.py), which imports this module
    sys.exit("error: `python -m flows.diht` is now the `diht` command (or python -m flows.cli): "
             "diht run | diht stage NAME | diht summary | diht serve; diht --help")
