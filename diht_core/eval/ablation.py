"""The ablation study (the DiHT paper's ablation table in miniature): the grid of runs, its statistics (mean +- std
over seeds, Welch's t-test against the baseline, the smallest difference the seeds can resolve) and its report."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from scipy import stats as sps

from ..config import Params, deep_merge
from ..data.files import atomic_write_text
from ..plots import pyplot, save_figure

UPSTREAM = ("download", "cat_filter", "concepts", "teacher", "pseudo_labels")


def grid(params: Params) -> list[tuple[str, dict]]:
    """(config name, overrides of train) for every config, then the beta sweep."""
    a = params.ablation
    runs = [(name, dict(ov)) for name, ov in a.configs.items()]
    for beta in a.beta_sweep:
        runs.append((f"{a.beta_sweep_of} beta={beta:g}", {**a.configs[a.beta_sweep_of], "hn_beta": beta}))
    return runs


def runs(params: Params, base_overrides: dict, root: Path) -> list[tuple[str, int, dict]]:
    """(config, seed, overrides of the whole params) of every run: the upstream outputs shared under root, each
    run's models, metrics and plots in root/runs/<config>/seed<k>/."""
    a = params.ablation
    return [(name, seed, deep_merge(base_overrides, {
        "train": {**ov, "steps": a.steps, "batch_size": a.batch_size, "seed": seed},
        "paths": {k: str(root / "runs" / slug(name) / f"seed{seed}" / k) for k in ("models", "metrics", "plots")},
        "benchmark": {"checkpoint": None}, "mlflow": {"registered_model": False}}))
        for name, ov in grid(params) for seed in a.seeds]


def upstream_digest(params: Params) -> str:
    """The identity of the upstream stages' outputs: the params they read."""
    dump = params.model_dump()
    return digest({k: dump[k] for k in ("seed", "paths", "download", "cat_filter", "concepts", "teacher",
                                        "pseudo_labels")})


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).replace("=", "")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def aggregate(results: list[dict], baseline: str, mode: str, params: Params | None = None) -> dict:
    """Mean +- std per config and task, Welch's t-test of each config's mean_main against the baseline, and
    a noise check: how far apart the configs are, in units of the seeds' spread."""
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
    json_path.parent.mkdir(parents=True, exist_ok=True)
    plot_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    configs = report["configs"]
    tasks = sorted({t for c in configs.values() for t in c["tasks"]})
    rows = ["config,task,mean,std"] + [f"{n},{t},{c['tasks'][t]['mean']:.6f},{c['tasks'][t]['std']:.6f}"
                                       for n, c in configs.items() for t in tasks if t in c["tasks"]]
    rows += [f"{n},mean,{c['mean_main']['mean']:.6f},{c['mean_main']['std']:.6f}" for n, c in configs.items()]
    csv = plot_stem.with_suffix(".csv")
    atomic_write_text(csv, "\n".join(rows) + "\n")
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
            cmd = ["dvc", "exp", "run", "--queue", "-n", f"{slug(name).replace('+', '-')}-s{seed}"]
            for k, v in sets.items():
                cmd += ["-S", f"train.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
            cmds.append(cmd)
    return cmds




def run_record(name: str, seed: int, overrides: dict, trained: dict, bench: dict, run_id: str) -> dict:
    """What the report keeps of one run (and what marks it done: the digest of its overrides)."""
    return {"config": name, "seed": seed, "digest": digest(overrides), "main": main_metrics(bench),
            "mean_main": bench["mean_main"], "chance": {t: r.get("chance") for t, r in bench["tasks"].items()},
            "final_loss": trained["final_loss"], "run_id": run_id}


def main_metrics(bench: dict) -> dict:
    """task -> main metric of the benchmark stage's metrics (the tasks that ran)."""
    return {t: r["main"] for t, r in bench["tasks"].items() if r.get("main") is not None}
