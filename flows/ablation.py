"""The Prefect flow `ablation`: every config x seed of params.yaml's `ablation` trains at the same budget of
samples seen and runs the benchmark (the grid and its statistics: diht_core/eval/ablation.py)."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from diht_core.config import deep_merge, load_params
from diht_core.data.files import atomic_write_text
from diht_core.eval import ablation as A
from diht_core.models import check_names
from flows.stages import TASKS
from tasks._cli import add_params_args, overrides_or_exit, params_or_exit
from tasks._lineage import run_tags
from tasks._stage import set_env, setup_mlflow


@flow(name="ablation", log_prints=True)
def ablation(params_path: str = "params.yaml", overrides: dict | None = None, quick: bool = False) -> dict:
    """The grid: upstream stages once, then train + benchmark for every config x seed; returns the report."""
    set_env()
    params = load_params(params_path, overrides)  # validated before any work starts
    mode = "quick" if quick else "full"
    base_ov = deep_merge(overrides or {}, params.ablation.quick) if quick else dict(overrides or {})
    params = load_params(params_path, base_ov) if quick else params
    root = Path("ablation") / mode
    up_ov = deep_merge(base_ov, {"paths": {k: str(root / k) for k in ("data", "models", "metrics", "plots")}})
    upstream = load_params(params_path, up_ov)
    runs = [(name, seed, ov, load_params(params_path, ov))  # every run's params are valid before any work
            for name, seed, ov in A.runs(params, up_ov, root)]
    for p in [upstream] + [r[3] for r in runs]:
        check_names(p)
    experiment_id = setup_mlflow(params)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ablation-{mode}",
                          tags={"diht.ablation": mode, **run_tags(params)}) as parent:
        mlflow.log_dict(params.ablation.model_dump(), "ablation_params.json")
        mlflow.log_params({"mode": mode, "runs": len(runs), "seeds": str(params.ablation.seeds),
                           "samples_seen": params.ablation.steps * params.ablation.batch_size})
        marker = root / "upstream.json"
        if not (marker.exists() and json.loads(marker.read_text()).get("digest") == A.upstream_digest(upstream)):
            for stage in A.UPSTREAM:
                TASKS[stage](upstream, parent.info.run_id)
            atomic_write_text(marker, json.dumps({"digest": A.upstream_digest(upstream)}))
        results = [one_run(name, seed, ov, p, parent.info.run_id, experiment_id) for name, seed, ov, p in runs]
        report = A.aggregate(results, params.ablation.baseline, mode, params)
        suffix = "" if mode == "full" else "_quick"
        paths = A.write_report(report, Path(params.paths.metrics) / f"ablation{suffix}.json",
                               Path(params.paths.plots) / f"ablation{suffix}")
        for path in paths:
            mlflow.log_artifact(str(path))
        mlflow.log_text(report["table"], "ablation.md")
        for cfg, r in report["configs"].items():
            mlflow.log_metric(f"{A.slug(cfg)}/mean_main", r["mean_main"]["mean"])
            mlflow.log_metric(f"{A.slug(cfg)}/mean_main_std", r["mean_main"]["std"])
    create_markdown_artifact(key=f"ablation-{mode}", markdown=report["table"],
                             description=f"DiHT ablation ({mode}): mean +- std over seeds")
    report["parent_run_id"] = parent.info.run_id
    return report


def one_run(name: str, seed: int, ov: dict, p, parent_id: str, experiment_id: str) -> dict:
    """Train + benchmark one config and seed in a child MLflow run; kept when already done with these overrides."""
    done = Path(p.paths.metrics) / "ablation_run.json"
    if done.exists() and json.loads(done.read_text()).get("digest") == A.digest(ov):
        return json.loads(done.read_text())
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name} seed={seed}", parent_run_id=parent_id,
                          nested=True, tags={"diht.ablation.config": name, "diht.ablation.seed": str(seed),
                                             **run_tags(p)}) as child:
        mlflow.log_params({f"train.{k}": v for k, v in ov["train"].items()})
        trained = TASKS["train"](p, child.info.run_id)
        bench = TASKS["benchmark"](p, child.info.run_id)
        mlflow.log_metrics({**{f"{t}/main": v for t, v in A.main_metrics(bench).items()},
                            "mean_main": bench["mean_main"]})
    record = A.run_record(name, seed, ov, trained, bench, child.info.run_id)
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    """The Prefect flow `ablation`: every config x seed of params.yaml's `ablation` trains at the same budget of
    samples seen and runs the benchmark (the grid and its statistics: diht_core/eval/ablation.py).

        python -m flows.ablation [--quick]    # ephemeral Prefect, local MLflow (what `make ablation` runs)
        prefect deployment run diht/ablation  # the deployment `ablation` of the flow `diht` (a sub-flow run)
        python -m flows.ablation --dvc-queue  # the same grid as DVC experiments (dvc exp run --queue -S ...)

    --set KEY=VALUE overrides a param of the file for every run (with --dvc-queue: DVC's -S KEY=VALUE).

    Upstream stages (download .. pseudo_labels) run once, in ablation/<full|quick>/; each run writes
    ablation/<mode>/runs/<config>/seed<k>/{models,metrics,plots}. A killed grid resumes: finished runs (same
    overrides) are kept. Outputs: metrics/ablation[_quick].json, plots/ablation[_quick].{png,csv}, an MLflow parent
    run whose children are the runs (each holding its train and benchmark stage runs), a Prefect artifact.
    """
    parser = argparse.ArgumentParser(prog="python -m flows.ablation", description=inspect.cleandoc(main.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--quick", action="store_true", help="tiny data and training (CI): the grid in minutes")
    parser.add_argument("--dvc-queue", action="store_true",
                        help="queue the grid as DVC experiments instead (dvc exp run --queue -S ...)")
    args = parser.parse_args(argv)
    set_env()
    params = params_or_exit(args)
    if args.quick:
        params_or_exit(args, params.ablation.quick)
    if args.dvc_queue:
        for cmd in A.dvc_queue_commands(params):
            cmd += [x for item in args.sets for x in ("-S", item)]  # --set is DVC's -S
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
        print("queued; run them with `dvc queue start -j 1` (or `dvc exp run --run-all`), compare with "
              "`dvc exp show --only-changed`")
        return
    print(ablation(params_path=args.params, overrides=overrides_or_exit(args), quick=args.quick)["table"])


if __name__ == "__main__":
    main()
