"""The `diht` command and the stage CLIs: --help at once, --set read as YAML and validated by the schema (a bad key
refused naming it, before any work), stages run in pipeline order with their inputs checked first."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, project_env
from diht_core.config import ParamsError, load_params, parse_sets
from tasks import STAGES
from tasks._stage import MissingInput, check_run_inputs

HEAVY = ("torch", "prefect", "mlflow", "numpy", "pydantic", "open_clip")


def _cli(args, cwd, timeout=300):
    (cwd / ".state" / "prefect").mkdir(parents=True, exist_ok=True)
    env = {**project_env(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_answers_at_once_and_imports_nothing_heavy(tmp_path):
    t0 = time.perf_counter()
    proc = _cli(["-m", "flows.cli", "--help"], tmp_path)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0 and "usage: diht" in proc.stdout
    assert all(c in proc.stdout for c in ("run", "stage", "summary", "serve"))
    assert elapsed < 3.0, f"diht --help took {elapsed:.2f} s"  # ~0.1 s idle; generous for a busy CI machine
    script = ("import sys\nfrom flows.cli import main\n"
              "for argv in (['--help'], ['run', '--help'], ['stage', '--help'], ['summary', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), file=sys.stderr)")
    proc = _cli(["-c", script], tmp_path)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
    assert "--set KEY=VALUE" in proc.stdout and "--stages STAGE" in proc.stdout


def test_set_values_are_yaml_and_nested():
    assert parse_sets(["benchmark.tasks=[synthetic_shape, synthetic_vqa]", "train.steps=20", "train.lr=1e-3",
                       "mlflow.registered_model=false", "mlflow.tracking_uri=", "paths.data=/tmp/a=b"]) == {
        "benchmark": {"tasks": ["synthetic_shape", "synthetic_vqa"]}, "train": {"steps": 20, "lr": 0.001},
        "mlflow": {"registered_model": False, "tracking_uri": None}, "paths": {"data": "/tmp/a=b"}}
    for bad, says in [("train.steps", "expected KEY=VALUE"), ("train..x=1", "expected KEY=VALUE"),
                      ("=3", "expected KEY=VALUE"), ("a=[1", "not a YAML value")]:
        with pytest.raises(ParamsError, match=says):
            parse_sets([bad])
    for twice in (["train.steps=1", "train.steps=2"], ["train={steps: 1}", "train.steps=2"],
                  ["train.steps=2", "train={steps: 1}"]):
        with pytest.raises(ParamsError, match="set twice"):
            parse_sets(twice)


def test_set_overrides_go_through_the_schema_and_reach_torchrun_ranks(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {steps: 5}\n")
    overrides = parse_sets(["train.steps=20", "benchmark.tasks=[synthetic_shape]"])
    p = load_params(params, overrides)
    assert p.train.steps == 20 and p.benchmark.tasks == ["synthetic_shape"]
    assert p.source == (str(params), overrides)  # what launch_torchrun hands every rank (--overrides)
    with pytest.raises(ParamsError, match=r"with overrides:\n  train.stepz: unknown key"):
        load_params(params, parse_sets(["train.stepz=20"]))
    with pytest.raises(ParamsError, match="train.steps"):
        load_params(params, parse_sets(["train.steps=-1"]))


def test_a_run_checks_the_inputs_no_stage_of_it_writes(tmp_path):
    p = load_params(ROOT / "params.yaml", {"paths": {k: str(tmp_path / k) for k in ("data", "models")}})
    check_run_inputs(list(STAGES), p)  # from scratch: each input comes from an earlier stage
    with pytest.raises(MissingInput, match=r"stage cat_filter: its input .*raw/train is missing; run the download"):
        check_run_inputs(["cat_filter", "concepts"], p)
    (tmp_path / "data" / "eval").mkdir(parents=True)
    with pytest.raises(MissingInput, match=r"stage benchmark: its input .*models/model.pt is missing; run the train"):
        check_run_inputs(["benchmark", "fewshot"], p)


@pytest.mark.parametrize("args, says", [
    (["-m", "flows.cli", "run", "--stages", "benchmark", "--set", "train.stepz=3"], "train.stepz: unknown key"),
    (["-m", "tasks.download", "--set", "download.num_train=many"], "download.num_train"),
    (["-m", "flows.cli", "stage", "download", "--set", "download.num_train"], "--set download.num_train: expected"),
])
def test_a_bad_set_is_refused_in_one_line_before_any_work(tmp_path, args, says):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and says in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / ".state" / "mlflow.db").exists()
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # the error and the key (or the error alone)


def test_a_run_missing_an_input_stops_in_one_line_before_prefect(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = _cli(["-m", "flows.cli", "run", "--stages", "benchmark", "fewshot"], tmp_path)
    assert proc.returncode == 66, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: stage benchmark: its input data/eval is missing; run the download stage first "
        f"(diht stage download, or python -m tasks.download)"]
    assert not (tmp_path / ".state" / "mlflow.db").exists()


@pytest.mark.slow
def test_diht_run_picks_stages_and_takes_set(tiny_project):
    """`diht run --stages benchmark fewshot --set benchmark.tasks=[synthetic_shape]` on eval data and a model."""
    import torch

    from diht_core.data.synthetic import write_eval_splits
    from diht_core.models import create_model

    p = load_params(tiny_project / "params.yaml")
    write_eval_splits(p.download, p.seed, tiny_project / "data" / "eval")
    torch.manual_seed(0)
    (tiny_project / "models").mkdir()
    torch.save(create_model(p.train.model)[0].state_dict(), tiny_project / "models" / "model.pt")
    proc = _cli(["-m", "flows.cli", "run", "--stages", "fewshot", "benchmark", "--set",
                 "benchmark.tasks=[synthetic_shape]", "--set", "fewshot.seeds=1"], tiny_project, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((tiny_project / "metrics" / "benchmark.json").read_text())
    assert list(bench["tasks"]) == ["synthetic_shape"]
    assert (tiny_project / "metrics" / "fewshot.json").exists()
    assert not (tiny_project / "metrics" / "train.json").exists()
    assert "diht run: benchmark, fewshot done" in proc.stdout and "synthetic_shape" in proc.stdout
    proc = _cli(["-m", "flows.cli", "summary"], tiny_project)
    assert proc.returncode == 0 and "synthetic_shape" in proc.stdout, proc.stderr[-2000:]


def test_progress_bars_say_what_they_count(tmp_path, capsys):
    from diht_core.cat.shards import filter_shards
    from diht_core.data.synthetic import _write_split

    samples = [{"__key__": f"{i:08d}", "txt": b"a red circle"} for i in range(3)]
    assert _write_split(iter(samples), tmp_path / "raw" / "train", 2, "train", 3) == 3
    assert filter_shards([], workers=1) == []
    err = capsys.readouterr().err
    assert "download: train samples" in err and "sample" in err.split("download: train samples")[1][:80]
    assert "cat_filter shards" in err
