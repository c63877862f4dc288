"""torchrun training (gloo on CPU) equals one process holding the whole batch; the train stage launches torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, project_env, tiny_params

HELPER = ROOT / "tests" / "helpers" / "dist_train.py"


def _env(tmp_path, **extra):
    """The helper's environment: the project first on PYTHONPATH, one thread, no torchrun variables, ``extra``
    (DIHT_* settings, tests/test_gpu.py)."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _run(tmp_path, out, *args, nproc=None, **env):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                              if nproc else []) + [str(HELPER), str(out), *map(str, args)]
    proc = subprocess.run(cmd, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("strategy,loss,accum,k", [
    ("ddp", "hn-nce", 1, 1),
    ("fsdp", "sigmoid", 2, 2),   # FSDP + FFF mining + 2 captions per image + cached-feature accumulation
    ("ddp", "infonce", 2, 1),
])
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, strategy, loss, accum, k):
    """Three SGD steps (an update proportional to the gradient: a gradient scaled wrongly across ranks shows)
    on 2 gloo ranks give the weights of one process holding the whole batch without accumulation."""
    one = _run(tmp_path, tmp_path / "one.pt", strategy, loss, 1, k)
    two = _run(tmp_path, tmp_path / "two.pt", strategy, loss, accum, k, nproc=2)
    assert np.allclose(one["losses"], two["losses"], rtol=1e-5, atol=1e-5)
    moved = max((one["model"][n] - one["init"][n]).abs().max().item() for n in one["model"])
    assert moved > 1e-3
    for name in one["model"]:
        d1, d2 = one["model"][name] - one["init"][name], two["model"][name] - two["init"][name]
        torch.testing.assert_close(d2, d1, rtol=0, atol=1e-3 * moved + 1e-6, msg=name)
    for name in one["heads"]:
        torch.testing.assert_close(two["heads"][name], one["heads"][name], rtol=0, atol=1e-5, msg=name)


def test_fsdp_checkpoint_and_resume_on_two_ranks(tmp_path):
    """AdamW under FSDP (sharded optimizer state + replicated scalars and heads): killed at step 2, resumed from
    the step-2 checkpoint, it ends where one uninterrupted process ends."""
    one = _run(tmp_path, tmp_path / "one.pt", "fsdp", "hn-nce", 1, 1, "adamw")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HELPER),
           str(tmp_path / "two.pt"), "fsdp", "hn-nce", "1", "1", "adamw", "2"]
    killed = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and len(list((tmp_path / "two.pt.ckpt").glob("*/latest.pt"))) == 1
    two = _run(tmp_path, tmp_path / "two.pt", "fsdp", "hn-nce", 1, 1, "adamw", nproc=2)
    assert two["resumed_from"] == 2
    assert np.allclose(one["losses"][2:], two["losses"][-1:], rtol=1e-5, atol=1e-5)
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=0, atol=2e-4, msg=name)


def _mini_project(tmp_path: Path, train: dict) -> Path:
    """Filtered shards + vocabulary sizes (what the train stage reads), a params.yaml with tiny training."""
    from diht_core.data.scenes import render, sample_scene
    from diht_core.data.shards import encode_jpg, write_shard

    rng = np.random.default_rng(0)
    for s in range(4):
        samples = []
        for i in range(12):
            sc = sample_scene(rng)
            caps = [f"a {sc.shapes[0].colour} {sc.shapes[0].shape}", f"one {sc.shapes[0].shape}"]
            samples.append({"__key__": f"{s}{i:08d}", "jpg": encode_jpg(render(sc, 64, rng)), "txt": caps[0],
                            "json": json.dumps({"captions": caps}).encode()})
        write_shard(tmp_path / "data" / "filtered" / f"{s:05d}.tar", samples)
    (tmp_path / "data" / "pseudo_labels").mkdir(parents=True)
    (tmp_path / "data" / "pseudo_labels" / "vocab_sizes.json").write_text('{"objects": 4, "attributes": 3}')
    params = tiny_params()
    params["train"].update({"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1,
                            "lambda_obj": 0.0, "lambda_attr": 0.0, **train})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.slow
def test_train_stage_launches_torchrun_and_logs_to_its_mlflow_run(tmp_path):
    import mlflow

    proj = _mini_project(tmp_path, {"launcher": "torchrun", "nproc_per_node": 2, "strategy": "ddp",
                                    "loader": "webdataset", "resample": True, "workers": 1, "device": "cpu"})
    env = {**project_env(proj), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tasks.train", "--params", "params.yaml"], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((proj / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["samples_seen"] == 32 and np.isfinite(metrics["final_loss"])
    import open_clip

    from diht_core.models import register_configs

    register_configs()
    open_clip.create_model("diht-tiny-vit", pretrained=str(proj / "models" / "model.pt"))  # a plain open_clip file
    mlflow.set_tracking_uri(f"sqlite:///{proj / '.state' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["diht"], output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]  # from rank 0
    assert run.data.params["train.launcher"] == "torchrun"
