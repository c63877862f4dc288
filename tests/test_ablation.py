"""The ablation grid: statistics, the report, params validation, the DVC queue, and the --quick flow end to end."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, project_env, tiny_params
from diht_core.config import ParamsError, validate_params
from diht_core.eval.ablation import aggregate, dvc_queue_commands, grid


def _results():
    rng = np.random.default_rng(0)
    out = []
    for name, level in (("baseline", 0.3), ("better", 0.5), ("same", 0.3)):
        for seed in range(3):
            main = {"synthetic_shape": level + 0.01 * rng.standard_normal(), "synthetic_count": 0.4 + 0.01 * seed}
            out.append({"config": name, "seed": seed, "main": main, "mean_main": statistics.fmean(main.values()),
                        "chance": {"synthetic_shape": 0.25, "synthetic_count": 0.333}})
    return out


def test_aggregate_mean_std_and_welch_test():
    from scipy import stats

    res = _results()
    rep = aggregate(res, "baseline", "quick")
    for name in ("baseline", "better", "same"):
        vals = [r["main"]["synthetic_shape"] for r in res if r["config"] == name]
        got = rep["configs"][name]["tasks"]["synthetic_shape"]
        assert got["mean"] == pytest.approx(np.mean(vals)) and got["std"] == pytest.approx(np.std(vals, ddof=1))
    base = [r["mean_main"] for r in res if r["config"] == "baseline"]
    better = [r["mean_main"] for r in res if r["config"] == "better"]
    assert rep["configs"]["better"]["p_vs_baseline"] == pytest.approx(stats.ttest_ind(better, base, equal_var=False).pvalue)
    assert rep["noise_check"]["significant_vs_baseline_p05"] == ["better"]
    assert rep["configs"]["baseline"]["p_vs_baseline"] is None
    assert "| better | 3 |" in rep["table"] and "| chance |" in rep["table"]


def test_grid_and_its_params_are_validated():
    p = validate_params(tiny_params())
    names = [n for n, _ in grid(p)]
    assert names[:5] == ["baseline", "cat", "cat+distill", "diht", "fff"] and "diht beta=0.25" in names
    assert dict(grid(p))["diht beta=0.25"]["hn_beta"] == 0.25 and dict(grid(p))["diht beta=0.25"]["loss"] == "hn-nce"
    bad = tiny_params()
    bad["ablation"]["configs"]["fff"]["captions_per_image"] = 2
    bad["ablation"]["configs"]["fff"]["loss"] = "infonce"
    with pytest.raises(ParamsError, match="ablation.*configs.fff"):
        validate_params(bad)
    bad = tiny_params()
    bad["ablation"]["configs"]["cat"]["no_such_knob"] = 1
    with pytest.raises(ParamsError, match="configs.cat"):
        validate_params(bad)
    bad = tiny_params()
    bad["ablation"]["baseline"] = "nope"
    with pytest.raises(ParamsError, match="baseline"):
        validate_params(bad)


def test_dvc_queue_commands_set_every_override():
    p = validate_params(tiny_params())
    cmds = dvc_queue_commands(p)
    assert len(cmds) == len(grid(p)) * len(p.ablation.seeds)
    first = cmds[0]
    assert first[:6] == ["dvc", "exp", "run", "--queue", "-n", "baseline-s0"]
    sets = [first[i + 1] for i, a in enumerate(first) if a == "-S"]
    assert "train.source=raw" in sets and "train.seed=0" in sets and f"train.steps={p.ablation.steps}" in sets


@pytest.mark.slow
def test_dvc_experiments_queue_in_a_git_repo(tiny_project):
    env = project_env(tiny_project)
    run = lambda *a: subprocess.run(a, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=300)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                                     "--allow-empty", "-m", "init"], ["dvc", "init", "-q"]):
        assert run(*cmd).returncode == 0
    run("git", "add", "-A")
    assert run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project").returncode == 0
    out = run(sys.executable, "-m", "flows.ablation", "--dvc-queue")
    assert out.returncode == 0, out.stderr[-2000:]
    status = run("dvc", "queue", "status")
    assert status.returncode == 0 and status.stdout.count("Queued") == len(dvc_queue_commands(
        validate_params(tiny_params()))), status.stdout


@pytest.mark.slow
def test_quick_ablation_flow_end_to_end(tiny_project):
    """--quick: upstream once, every config x 2 seeds, the report in JSON/plot/MLflow/Prefect; a rerun resumes."""
    import mlflow

    env = project_env(tiny_project)
    cmd = [sys.executable, "-m", "flows.ablation", "--quick"]
    proc = subprocess.run(cmd, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tiny_project / "metrics" / "ablation_quick.json").read_text())
    p = validate_params(yaml.safe_load((tiny_project / "params.yaml").read_text()))
    n_configs = len(p.ablation.configs) + len(p.ablation.quick["ablation"]["beta_sweep"])
    assert len(rep["configs"]) == n_configs
    assert all(c["mean_main"]["n"] == 2 for c in rep["configs"].values())
    assert (tiny_project / "plots" / "ablation_quick.png").stat().st_size > 0
    assert "| baseline | 2 |" in proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / '.state' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("diht.ablation") == "quick"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id
                and "diht.ablation.config" in r.data.tags]
    assert len(children) == 2 * n_configs
    trains = [r for r in runs if r.data.tags.get("diht.stage") == "train"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trains} == {c.info.run_id for c in children}
    art = subprocess.run(["prefect", "artifact", "inspect", "ablation-quick"], cwd=tiny_project,
                         env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    assert art.returncode == 0 and "baseline" in art.stdout, art.stdout[-2000:] + art.stderr[-2000:]
    # a rerun keeps every finished run: no new training
    proc = subprocess.run(cmd, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    assert len([r for r in runs if r.data.tags.get("diht.stage") == "train"]) == len(trains)
