"""The ablation grid (the DiHT paper's ablation table in miniature): every config x seed of `ablation` in
params.yaml trains at the same budget of samples seen and runs the benchmark; the report is mean +- std.

    python -m flows.ablation [--quick]          # ephemeral Prefect, local MLflow (what `make ablation` runs)
    prefect deployment run diht/ablation        # the deployment `ablation` of the flow `diht`
    python -m flows.ablation --dvc-queue        # the same grid as DVC experiments (dvc exp run --queue -S ...)

Upstream stages (download .. pseudo_labels) run once, in ablation/<full|quick>/; each run writes
ablation/<mode>/runs/<config>/seed<k>/{models,metrics,plots}. A killed grid resumes: finished runs (same
overrides) are kept. Outputs: metrics/ablation[_quick].json, plots/ablation[_quick].{png,csv}, an MLflow parent
run whose children are the runs (each holding its train and benchmark stage runs), a Prefect artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

from diht_core.config import Params, ParamsError, deep_merge, load_params

UPSTREAM = ("download", "cat_filter", "concepts", "teacher", "pseudo_labels")


def grid(params: Params) -> list[tuple[str, dict]]:
    """(config name, overrides of train) for every config, then the beta sweep."""
    a = params.ablation
    runs = [(name, dict(ov)) for name, ov in a.configs.items()]
    for beta in a.beta_sweep:
        runs.append((f"{a.beta_sweep_of} beta={beta:g}", {**a.configs[a.beta_sweep_of], "hn_beta": beta}))
    return runs


def resolve(params_path: str, overrides: dict | None, quick: bool) -> tuple[dict, str]:
    """The overrides the grid runs under (the quick ones merged in) and its mode, validated."""
    base = load_params(params_path, overrides)  # validated before any work starts
    ov = deep_merge(overrides or {}, base.ablation.quick) if quick else dict(overrides or {})
    load_params(params_path, ov)
    return ov, "quick" if quick else "full"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).replace("=", "")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_ablation(params_path: str = "params.yaml", overrides: dict | None = None, quick: bool = False) -> dict:
    """The grid, inside a Prefect flow run (tasks are the stages); returns the report."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    from tasks._stage import set_env, setup_mlflow
    from tasks.benchmark import benchmark
    from tasks.train import train_task
    from flows.diht import TASKS

    set_env()
    base_ov, mode = resolve(params_path, overrides, quick)
    params = load_params(params_path, base_ov)
    root = Path("ablation") / mode
    up_ov = deep_merge(base_ov, {"paths": {k: str(root / k) for k in ("data", "models", "metrics", "plots")}})
    runs = [(name, seed, deep_merge(up_ov, {
        "train": {**ov, "steps": params.ablation.steps, "batch_size": params.ablation.batch_size, "seed": seed},
        "paths": {k: str(root / "runs" / _slug(name) / f"seed{seed}" / k) for k in ("models", "metrics", "plots")},
        "benchmark": {"checkpoint": None}, "mlflow": {"registered_model": False}}))
        for name, ov in grid(params) for seed in params.ablation.seeds]
    for _, _, ov in runs:  # every run's params are valid before any work starts
        load_params(params_path, ov)
    experiment_id = setup_mlflow(params)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ablation-{mode}",
                          tags={"diht.ablation": mode}) as parent:
        mlflow.log_dict(params.ablation.model_dump(), "ablation_params.json")
        mlflow.log_params({"mode": mode, "runs": len(runs), "seeds": str(params.ablation.seeds),
                           "samples_seen": params.ablation.steps * params.ablation.batch_size})
        marker = root / "upstream.json"
        dump = load_params(params_path, up_ov).model_dump()
        up_digest = _digest({k: dump[k] for k in ("seed", "paths", "download", "cat_filter", "concepts", "teacher",
                                                  "pseudo_labels")})
        if not (marker.exists() and json.loads(marker.read_text()).get("digest") == up_digest):
            for stage in UPSTREAM:
                TASKS[stage](params_path, up_ov, parent.info.run_id)
            marker.write_text(json.dumps({"digest": up_digest}))
        results = []
        for name, seed, ov in runs:
            results.append(_one_run(params_path, name, seed, ov, parent.info.run_id, experiment_id,
                                    train_task, benchmark))
        report = aggregate(results, params.ablation.baseline, mode, params)
        suffix = "" if mode == "full" else "_quick"
        paths = write_report(report, Path(params.paths.metrics) / f"ablation{suffix}.json",
                             Path(params.paths.plots) / f"ablation{suffix}")
        for path in paths:
            mlflow.log_artifact(str(path))
        mlflow.log_text(report["table"], "ablation.md")
        for cfg, r in report["configs"].items():
            mlflow.log_metric(f"{_slug(cfg)}/mean_main", r["mean_main"]["mean"])
            mlflow.log_metric(f"{_slug(cfg)}/mean_main_std", r["mean_main"]["std"])
    create_markdown_artifact(key=f"ablation-{mode}", markdown=report["table"],
                             description=f"DiHT ablation ({mode}): mean +- std over seeds")
    report["parent_run_id"] = parent.info.run_id
    return report


def _one_run(params_path, name, seed, ov, parent_id, experiment_id, train_task, benchmark) -> dict:
    """Train + benchmark one config and seed in a child MLflow run; kept when already done with these overrides."""
    import mlflow

    p = load_params(params_path, ov)
    done = Path(p.paths.metrics) / "ablation_run.json"
    if done.exists() and json.loads(done.read_text()).get("digest") == _digest(ov):
        return json.loads(done.read_text())
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name} seed={seed}", parent_run_id=parent_id,
                          nested=True, tags={"diht.ablation.config": name, "diht.ablation.seed": str(seed)}) as child:
        mlflow.log_params({f"train.{k}": v for k, v in ov["train"].items()})
        trained = train_task(params_path, ov, child.info.run_id)
        bench = benchmark(params_path, ov, child.info.run_id)
        mains = {t: r["main"] for t, r in bench["tasks"].items() if r.get("main") is not None}
        mlflow.log_metrics({**{f"{t}/main": v for t, v in mains.items()}, "mean_main": bench["mean_main"]})
    record = {"config": name, "seed": seed, "digest": _digest(ov), "main": mains, "mean_main": bench["mean_main"],
              "chance": {t: r.get("chance") for t, r in bench["tasks"].items()},
              "final_loss": trained["final_loss"], "run_id": child.info.run_id}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(record, indent=1))
    return record


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def aggregate(results: list[dict], baseline: str, mode: str, params: Params | None = None) -> dict:
    """Mean +- std per config and task, Welch's t-test of each config's mean_main against the baseline, and
    a noise check: how far apart the configs are, in units of the seeds' spread."""
    from scipy import stats as sps

    configs: dict[str, dict] = {}
    for name in dict.fromkeys(r["config"] for r in results):
        rs = [r for r in results if r["config"] == name]
        tasks = sorted({t for r in rs for t in r["main"]})
        configs[name] = {"tasks": {t: _stats([r["main"][t] for r in rs if t in r["main"]]) for t in tasks},
                         "mean_main": _stats([r["mean_main"] for r in rs]), "seeds": [r["seed"] for r in rs]}
    base = configs[baseline]["mean_main"]["values"]
    for name, c in configs.items():
        vals = c["mean_main"]["values"]
        c["delta_vs_baseline"] = c["mean_main"]["mean"] - statistics.fmean(base)
        if name != baseline and len(vals) > 1 and len(base) > 1 and (statistics.pvariance(vals) + statistics.pvariance(base)) > 0:
            c["p_vs_baseline"] = float(sps.ttest_ind(vals, base, equal_var=False).pvalue)
        else:
            c["p_vs_baseline"] = None
    means = [c["mean_main"]["mean"] for c in configs.values()]
    seed_std = statistics.fmean([c["mean_main"]["std"] for c in configs.values()])
    spread = max(means) - min(means)
    chance = {t: v for r in results for t, v in r["chance"].items() if v is not None}
    n_seeds = min(c["mean_main"]["n"] for c in configs.values())
    pooled = math.sqrt(statistics.fmean([c["mean_main"]["std"] ** 2 for c in configs.values()]))
    # the smallest difference of two configs' means that a t-test at p < 0.05 could resolve with these seeds
    mdd = float(sps.t.ppf(0.975, 2 * (n_seeds - 1)) * pooled * math.sqrt(2 / n_seeds)) if n_seeds > 1 else math.inf
    noise = {"mean_seed_std": seed_std, "pooled_seed_std": pooled, "min_detectable_difference": mdd,
             "config_range": spread,
             "range_over_seed_std": spread / seed_std if seed_std > 0 else math.inf,
             "significant_vs_baseline_p05": sorted(n for n, c in configs.items()
                                                   if c["p_vs_baseline"] is not None and c["p_vs_baseline"] < 0.05)}
    report = {"mode": mode, "baseline": baseline, "configs": configs, "chance": chance, "noise_check": noise}
    if params is not None:
        report["samples_seen"] = params.ablation.steps * params.ablation.batch_size
    report["table"] = markdown(report)
    return report


def markdown(report: dict) -> str:
    configs = report["configs"]
    tasks = sorted({t for c in configs.values() for t in c["tasks"]})
    short = {t: t.replace("synthetic_", "") for t in tasks}
    head = "| config | seeds | " + " | ".join(short[t] for t in tasks) + " | mean | Δ mean vs baseline (p) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in configs.items():
        cells = [f"{c['tasks'][t]['mean']:.3f} ± {c['tasks'][t]['std']:.3f}" if t in c["tasks"] else "–"
                 for t in tasks]
        p = c["p_vs_baseline"]
        delta = "" if name == report["baseline"] else f"{c['delta_vs_baseline']:+.3f}" + (f" (p={p:.2f})" if p is not None else "")
        lines.append(f"| {name} | {c['mean_main']['n']} | " + " | ".join(cells)
                     + f" | {c['mean_main']['mean']:.3f} ± {c['mean_main']['std']:.3f} | {delta} |")
    if report["chance"]:
        lines.append("| chance | | " + " | ".join(f"{report['chance'].get(t, float('nan')):.3f}" for t in tasks)
                     + " | | |")
    return "\n".join(lines)


def write_report(report: dict, json_path: Path, plot_stem: Path) -> list[Path]:
    """metrics JSON, a CSV for DVC plots and a PNG (mean +- std per config, one panel per task + the mean)."""
    from diht_core.plots import pyplot, save_figure

    json_path.parent.mkdir(parents=True, exist_ok=True)
    plot_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    configs = report["configs"]
    tasks = sorted({t for c in configs.values() for t in c["tasks"]})
    rows = ["config,task,mean,std"] + [f"{n},{t},{c['tasks'][t]['mean']:.6f},{c['tasks'][t]['std']:.6f}"
                                       for n, c in configs.items() for t in tasks if t in c["tasks"]]
    rows += [f"{n},mean,{c['mean_main']['mean']:.6f},{c['mean_main']['std']:.6f}" for n, c in configs.items()]
    csv = plot_stem.with_suffix(".csv")
    csv.write_text("\n".join(rows) + "\n")
    plt = pyplot()
    panels = tasks + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.6), sharey=False)
    names = list(configs)
    for ax, t in zip(axes, panels):
        st = [configs[n]["mean_main"] if t == "mean" else configs[n]["tasks"].get(t) for n in names]
        ax.bar(range(len(names)), [s["mean"] if s else 0 for s in st], yerr=[s["std"] if s else 0 for s in st],
               capsize=3, color="tab:blue", alpha=0.7)
        for i, s in enumerate(st):
            if s:
                ax.plot([i] * len(s["values"]), s["values"], "k.", ms=3)
        if t in report["chance"]:
            ax.axhline(report["chance"][t], color="gray", ls="--", lw=1)
        ax.set_title(t.replace("synthetic_", ""))
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"ablation ({report['mode']}): mean ± std over seeds (dots: seeds; dashed: chance)", fontsize=9)
    png = plot_stem.with_suffix(".png")
    save_figure(fig, png)
    return [json_path, csv, png]


def dvc_queue_commands(params: Params) -> list[list[str]]:
    """`dvc exp run --queue -n <config>-s<seed> -S train.<key>=<value> ...` for every run of the grid
    (then `dvc queue start` or `dvc exp run --run-all`; `dvc exp show` compares them)."""
    a = params.ablation
    cmds = []
    for name, ov in grid(params):
        for seed in a.seeds:
            sets = {**ov, "steps": a.steps, "batch_size": a.batch_size, "seed": seed}
            cmd = ["dvc", "exp", "run", "--queue", "-n", f"{_slug(name).replace('+', '-')}-s{seed}"]
            for k, v in sets.items():
                cmd += ["-S", f"train.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
            cmds.append(cmd)
    return cmds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny data and training (CI): the grid in minutes")
    parser.add_argument("--dvc-queue", action="store_true",
                        help="queue the grid as DVC experiments instead (dvc exp run --queue -S ...)")
    args = parser.parse_args(argv)
    from tasks._stage import set_env

    set_env()
    try:
        resolve(args.params, None, args.quick)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.dvc_queue:
        import subprocess

        for cmd in dvc_queue_commands(load_params(args.params)):
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
        print("queued; run them with `dvc queue start -j 1` (or `dvc exp run --run-all`), compare with "
              "`dvc exp show --only-changed`")
        return
    from flows.diht import diht

    report = diht(params_path=args.params, ablation=True, quick=args.quick)
    print(report["table"])


if __name__ == "__main__":
    main()
