"""The CAT stage mapped over shards by Prefect's DaskTaskRunner gives the same decisions as the process pool."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import project_env

pytestmark = pytest.mark.slow


def test_dask_task_runner_matches_process_pool(tiny_project):
    env = project_env(tiny_project)
    py = sys.executable

    def run(*args):
        res = subprocess.run([py, *args], cwd=tiny_project, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-4000:]

    run("-m", "tasks.download", "--params", "params.yaml")
    run("-m", "tasks.cat_filter", "--params", "params.yaml")
    process = pd.read_parquet(tiny_project / "data" / "cat" / "decisions.parquet")
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["cat_filter"].update(task_runner="dask", workers=2, min_complexity=2)  # new config: no shard reused
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    code = ("from prefect import flow\nfrom diht_core.config import load_params\n"
            "from tasks._stage import run_stage\nfrom tasks.cat_filter import body\n"
            "@flow\ndef f():\n    return run_stage('cat_filter', body, load_params('params.yaml'))\nf()\n")
    run("-c", code)
    dask = pd.read_parquet(tiny_project / "data" / "cat" / "decisions.parquet")
    assert len(dask) == len(process) == 240
    expected = process.kept & (process.complexity >= 2)
    assert (dask.kept == expected).all()
    assert (dask.key == process.key).all()
