"""The Prefect flow `ablation`: every config x seed of params.yaml's `ablation` trains at the same budget of
samples seen and runs the benchmark (the grid and its statistics: diht_core/eval/ablation.py)."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import subprocess
import time
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
    """The grid: the upstream stages once per distinct upstream, then train + benchmark for every arm x seed;
    returns the report."""
    set_env()
    params, mode, tests, grid, upstreams, loaded = _grid(params_path, overrides, quick)
    experiment_id = setup_mlflow(params)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ablation-{mode}",
                          tags={"diht.ablation": mode, **run_tags(params)}) as parent:
        mlflow.log_dict(params.ablation.model_dump(), "ablation_params.json")
        mlflow.log_params({"mode": mode, "runs": len(grid), "arms": len({r["arm"] for r in grid}),
                           "upstreams": len(upstreams), "seeds": str(params.ablation.seeds),
                           "samples_seen": params.ablation.steps * params.ablation.batch_size})
        results, done = [], [done_record(r["overrides"], p) for r, p in zip(grid, loaded)]
        todo, ran, started = sum(d is None for d in done), 0, time.monotonic()
        print(f"[ablation] {len(grid)} runs: {len(grid) - todo} done before, {todo} to run")
        for r, p, record in zip(grid, loaded, done):
            if record is None:
                ensure_upstream(upstreams[r["upstream_digest"]], parent.info.run_id)
                record = one_run(r["arm"], r["seed"], r["overrides"], p, upstreams[r["upstream_digest"]],
                                 parent.info.run_id, experiment_id)
                ran += 1
                left = (time.monotonic() - started) / ran * (todo - ran)
                print(f"[ablation] {r['arm']} seed={r['seed']} done: {ran} of {todo} this time, "
                      f"about {left / 60:.0f} min left")
            results.append(record)
        report = A.aggregate(results, tests, mode, params)
        suffix = "" if mode == "full" else "_quick"
        paths = A.write_report(report, Path(params.paths.metrics) / f"ablation{suffix}.json",
                               Path(params.paths.plots) / f"ablation{suffix}")
        for path in paths:
            mlflow.log_artifact(str(path))
        mlflow.log_text(report["table"], "ablation.md")
        log_summary(report)
    create_markdown_artifact(key=f"ablation-{mode}", markdown=report["table"],
                             description=f"DiHT ablation ({mode}): each component in its premise's world and its "
                                         "control world")
    report["parent_run_id"] = parent.info.run_id
    return report


def _grid(params_path: str, overrides: dict | None, quick: bool):
    """The grid's params, mode, tests, runs, upstream params and each run's params, all validated before any
    work starts."""
    params = load_params(params_path, overrides)
    mode = "quick" if quick else "full"
    base_ov = (deep_merge(overrides or {}, params.ablation.quick) if quick
               else deep_merge(params.ablation.full, overrides or {}))  # a --set wins over `full`
    params = load_params(params_path, base_ov)
    _, tests = A.plan(params)
    grid = A.runs(params, base_ov, Path("ablation") / mode)
    upstreams = {r["upstream_digest"]: load_params(params_path, r["upstream"]) for r in grid}
    loaded = [load_params(params_path, r["overrides"]) for r in grid]
    for p in [*upstreams.values(), *loaded]:
        check_names(p)
    return params, mode, tests, grid, upstreams, loaded


def grid_status(params_path: str, overrides: dict | None = None, quick: bool = False) -> str:
    """Which runs of the grid are done (a markdown table: arm, seeds done of seeds), reading only their records."""
    _, mode, _, grid, _, loaded = _grid(params_path, overrides, quick)
    per_arm: dict[str, list[int]] = {}
    for r, p in zip(grid, loaded):
        per_arm.setdefault(r["arm"], [0, 0])
        per_arm[r["arm"]][1] += 1
        per_arm[r["arm"]][0] += done_record(r["overrides"], p) is not None
    done = sum(d for d, _ in per_arm.values())
    rows = [f"| {arm} | {d} of {n} |" for arm, (d, n) in per_arm.items()]
    return "\n".join([f"ablation ({mode}): {done} of {len(grid)} runs done", "", "| arm | runs done |", "|---|---|",
                      *rows])


def ensure_upstream(upstream, parent_id: str) -> None:
    """Run the upstream stages into their own folder unless it already holds them (same params digest). The
    leading stages another finished upstream shares (same params up to them) are copied from it, not rerun."""
    folder = Path(upstream.paths.data).parent
    marker, stages, digest = folder / "upstream.json", A.stage_digests(upstream), A.upstream_digest(upstream)
    if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
        return
    donors = [(A.shared_prefix(stages, json.loads(m.read_text()).get("stages", [])), m.parent)
              for m in folder.parent.glob("*/upstream.json") if m.parent != folder]
    shared, donor = max(donors, default=(0, None), key=lambda d: d[0])
    if shared:
        for k in ("data", "models", "metrics", "plots"):
            if (donor / k).exists():
                shutil.copytree(donor / k, folder / k, dirs_exist_ok=True)
        print(f"[ablation] upstream {folder.name}: {', '.join(A.UPSTREAM[:shared])} copied from {donor.name}")
    for stage in A.UPSTREAM[shared:]:
        TASKS[stage](upstream, parent_id)
    atomic_write_text(marker, json.dumps({"digest": digest, "stages": stages}))


def retest_file(json_path: Path) -> list[Path]:
    """A.retest on a report file, written back with its CSV and plots (metrics/<x>/ablation.json ->
    plots/<x>/ablation.*; beside the JSON when it is not under a metrics folder)."""
    if not json_path.is_file():
        raise SystemExit(f"--retest: no report at {json_path}")
    try:
        report = A.retest(json.loads(json_path.read_text()))
    except (ValueError, KeyError) as e:
        raise SystemExit(f"--retest {json_path}: {e}") from None
    parts = list(json_path.parts)
    if "metrics" in parts[:-1]:
        parts[len(parts) - 2 - parts[-2::-1].index("metrics")] = "plots"  # the last metrics folder of the path
    return A.write_report(report, json_path, Path(*parts).with_suffix(""))


def log_summary(report: dict) -> None:
    """The summary in the parent MLflow run: each arm's task mean and its mechanisms, each test's numbers."""
    metrics = {}
    for arm, r in report["arms"].items():
        key = A.slug(arm)
        metrics.update({f"{key}/mean_main": r["mean_main"]["mean"], f"{key}/mean_main_std": r["mean_main"]["std"]})
        if r["sampling"]["eval_se_of_mean"] is not None:
            metrics[f"{key}/eval_se_of_mean"] = r["sampling"]["eval_se_of_mean"]
        for name, m in r["mechanisms"].items():
            if isinstance(m, dict):
                metrics.update({f"{key}/{name}/{k}_{stat}": x for k, v in m.items() if isinstance(v, dict)
                                for stat, x in v.items()})
    for t in A.report_tests(report):
        key = A.slug(t["comparison"] + ("_" + t["world"] if t["world"] else f"_{A.fmt(t['value'])}"))
        metrics.update({f"{key}/{k}": t[k] for k in ("delta", "p_paired", "p_paired_holm", "mdd_paired", "p", "p_holm", "mdd")
                        if t[k] is not None and math.isfinite(t[k])})
    mlflow.log_metrics(metrics)


def _record_path(p) -> Path:
    return Path(p.paths.metrics) / "ablation_run.json"


def done_record(ov: dict, p) -> dict | None:
    """The record of this run when it is already done with these overrides (its digest), else None."""
    done = _record_path(p)
    record = json.loads(done.read_text()) if done.exists() else None
    return record if record is not None and record.get("digest") == A.digest(ov) else None


def one_run(name: str, seed: int, ov: dict, p, upstream, parent_id: str, experiment_id: str) -> dict:
    """Train + benchmark one arm and seed in a child MLflow run (the caller skips the runs already done)."""
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name} seed={seed}", parent_run_id=parent_id,
                          nested=True, tags={"diht.ablation.config": name, "diht.ablation.seed": str(seed),
                                             **run_tags(p)}) as child:
        mlflow.log_params({f"train.{k}": v for k, v in ov["train"].items()})
        mlflow.log_params({**{f"download.world.{k}": v for k, v in p.download.world.model_dump().items()},
                           "cat_filter.min_complexity": p.cat_filter.min_complexity,
                           "pseudo_labels.top_k": p.pseudo_labels.top_k})
        trained = TASKS["train"](p, child.info.run_id)
        bench = TASKS["benchmark"](p, child.info.run_id)
        mlflow.log_metrics({**{f"{t}/main": v for t, v in A.main_metrics(bench).items()},
                            "mean_main": bench["mean_main"]})
    measured = A.mechanisms(Path(p.paths.metrics) / "train.json",
                            Path(upstream.paths.metrics) / "pseudo_labels.json")
    record = A.run_record(name, seed, ov, trained, bench, child.info.run_id,
                          A.split_sizes(Path(p.paths.data), p.benchmark.tasks), measured)
    atomic_write_text(_record_path(p), json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    """The Prefect flow `ablation`: every config x seed of params.yaml's `ablation` trains at the same budget of
    samples seen and runs the benchmark (the grid and its statistics: diht_core/eval/ablation.py).

        python -m flows.ablation [--quick]    # ephemeral Prefect, local MLflow (what `make ablation` runs)
        prefect deployment run diht/ablation  # the deployment `ablation` of the flow `diht` (a sub-flow run)
        python -m flows.ablation --dvc-queue  # the same grid as DVC experiments (dvc exp run --queue -S ...)
        python -m flows.ablation --retest metrics/ablation_x/ablation.json  # its tests again, nothing rerun
        python -m flows.ablation --compare metrics/ablation.json rerun/metrics/ablation.json  # reproduced?
        python -m flows.ablation --set "ablation.seeds=[0]"  # every arm, seed 0 (--compare: identical or not)
        python -m flows.ablation --status     # which runs are done, per arm; runs nothing

    --set KEY=VALUE overrides a param of the file for every run (with --dvc-queue: DVC's -S KEY=VALUE).

    Each comparison runs its component and baseline in the world where its premise holds and in its control
    world (download.world), each sweep its config at every value. Upstream stages (download .. pseudo_labels) run
    once per distinct upstream, in ablation/<full|quick>/upstream/<digest>/; each run writes
    ablation/<mode>/runs/<arm>/seed<k>/{models,metrics,plots}. A killed grid resumes: finished runs (same
    overrides) are kept, and an upstream whose runs are all done is not needed again. Outputs:
    metrics/ablation[_quick].json (+ its markdown `table`), plots/ablation[_quick].{png,csv} and
    plots/ablation[_quick]_effects.png, an MLflow parent run (the summary as metrics) whose children are the runs
    (each holding its train and benchmark stage runs), a Prefect artifact.
    """
    parser = argparse.ArgumentParser(prog="python -m flows.ablation", description=inspect.cleandoc(main.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--quick", action="store_true", help="tiny data and training (CI): the grid in minutes")
    parser.add_argument("--dvc-queue", action="store_true",
                        help="queue the grid as DVC experiments instead (dvc exp run --queue -S ...)")
    parser.add_argument("--retest", metavar="REPORT_JSON", type=Path,
                        help="compute a written report's tests, verdicts and table again from its arms' per-seed values "
                             "(this version's statistics); rewrites it and its plots (under plots/ where the report "
                             "is under metrics/); trains nothing, logs nothing")
    parser.add_argument("--status", action="store_true",
                        help="print which runs of the grid are done (per arm) and run nothing")
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE_JSON", "RERUN_JSON"), type=Path,
                        help="whether a rerun's report reproduces a reference (e.g. metrics/ablation.json as "
                             "committed): per arm the difference and its z over the seeds, per test the verdict; "
                             "exit 1 when it does not")
    args = parser.parse_args(argv)
    if args.compare:
        ref, new = (json.loads(p.read_text()) for p in args.compare)
        try:
            c = A.compare(ref, new)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--compare: {e}") from None
        print(A.compare_table(c))
        if c["reproduced"] == "no":
            raise SystemExit(1)
        return
    if args.retest:
        for path in retest_file(args.retest):
            print(f"[ablation] wrote {path}")
        return
    set_env()
    params = params_or_exit(args)
    params_or_exit(args, params.ablation.quick if args.quick else params.ablation.full)
    if args.status:
        print(grid_status(args.params, overrides_or_exit(args), args.quick))
        return
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
