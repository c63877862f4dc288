"""Runs that cannot mix or corrupt each other: the data folder's lock, atomic writes, two checkpoints with a
fallback, a non-finite loss that stops training, bad params refused at the CLI before any work."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

import diht_core.train.loop as loop
from diht_core.config import TrainParams, load_params
from diht_core.data.files import atomic_torch_save
from diht_core.data.lock import DataFolderBusy, data_lock
from diht_core.data.shards import write_shard
from diht_core.train import load_train_set, train
from diht_core.train.checkpoint import LATEST, PREVIOUS

from conftest import ROOT, project_env
from test_distributed import _mini_project
from test_train import MAX_PIXELS, SIZE, _pseudo, _run, _shards

HOLD = ("import sys\nfrom diht_core.data.lock import data_lock\nwith data_lock(sys.argv[1], 'cat_filter'):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n")


def _hold(data, env=None):
    """A process holding data's lock until its stdin closes (or it is killed)."""
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_while_the_lock_is_held_and_a_dead_holder_blocks_nothing(tmp_path):
    data = tmp_path / "data"
    holder = _hold(data)
    try:
        with pytest.raises(DataFolderBusy, match=rf"'cat_filter' \(pid {holder.pid} on .*, since \d{{4}}-"):
            with data_lock(data, "train"):
                pass
    finally:
        holder.kill()  # kill -9: the kernel frees the lock
        holder.wait()
    with data_lock(data, "train"):
        with data_lock(data, "benchmark"):  # a stage inside another one's, in one process
            pass
    with data_lock(data, "benchmark"):  # sequential stages each take and release it
        pass


def test_the_stage_cli_stops_at_once_naming_the_running_one(tiny_project):
    holder = _hold(tiny_project / "data", project_env(tiny_project))
    try:
        proc = subprocess.run([sys.executable, "-m", "tasks.cat_filter", "--params", "params.yaml"],
                              cwd=tiny_project, env=project_env(tiny_project), capture_output=True, text=True,
                              timeout=300)
    finally:
        holder.stdin.close()
        holder.wait()
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"'cat_filter' (pid {holder.pid}" in proc.stderr
    assert not (tiny_project / "metrics").exists()


def test_atomic_writes_leave_no_temporary_file_after_a_failure(tmp_path):
    write_shard(tmp_path / "0.tar", [{"__key__": "a", "txt": "kept"}])
    before = (tmp_path / "0.tar").read_bytes()
    with pytest.raises(ValueError, match="cannot store"):  # a value that has no encoding, mid-shard
        write_shard(tmp_path / "0.tar", [{"__key__": "a", "txt": "new"}, {"__key__": "b", "jpg": object()}])
    with pytest.raises(Exception, match="pickle"):
        atomic_torch_save({"f": lambda: 1}, tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.tar"] and (tmp_path / "0.tar").read_bytes() == before


def test_atomic_torch_save_writes_the_bytes_of_a_plain_save(tmp_path):
    """The archive inside is named after the final file, as torch.save names it: the same state, the same bytes."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "plain.pt")
    atomic_torch_save(state, tmp_path / "sub" / "plain.pt")
    assert (tmp_path / "sub" / "plain.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()
    assert zipfile.ZipFile(tmp_path / "sub" / "plain.pt").namelist()[0].startswith("plain/")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["plain.pt"]


@pytest.fixture(scope="module")
def trainset(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    keys = _shards(d)
    from diht_core.models import create_model

    torch.manual_seed(0)
    return load_train_set(d, SIZE, create_model("diht-tiny-vit")[2], MAX_PIXELS, _pseudo(keys))


CFG = dict(seed=0, steps=6, batch_size=8, warmup_steps=2, checkpoint_every=2, log_every=1, lambda_obj=0.5,
           lambda_attr=0.5)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, trainset):
    cfg = TrainParams(**CFG)
    straight, _ = _run(tmp_path / "a", trainset, cfg)
    assert list((tmp_path / "a" / "ckpt").iterdir()) == []  # a finished run keeps no checkpoint
    assert _run(tmp_path / "b", trainset, cfg, stop_at=5) == (None, None)  # killed after the step-4 checkpoint
    (run_dir,) = (tmp_path / "b" / "ckpt").iterdir()  # one folder per run configuration
    assert sorted(p.name for p in run_dir.iterdir()) == [LATEST, PREVIOUS]
    assert torch.load(run_dir / PREVIOUS, weights_only=True)["step"] == 2
    (run_dir / LATEST).write_bytes((run_dir / LATEST).read_bytes()[:1000])  # torn
    with pytest.warns(UserWarning) as warned:
        resumed, out = _run(tmp_path / "b", trainset, cfg)
    said = " ".join(str(w.message) for w in warned)
    assert "latest.pt is unreadable" in said and "resuming from" in said and "previous.pt (step 2)" in said
    assert out["resumed_from_step"] == 2
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    assert not run_dir.exists()  # the finished run's own checkpoints are gone


def test_both_checkpoints_corrupt_start_afresh(tmp_path, trainset):
    cfg = TrainParams(**CFG)
    assert _run(tmp_path, trainset, cfg, stop_at=5) == (None, None)
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    for name in (LATEST, PREVIOUS):
        (run_dir / name).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="training starts afresh"):
        _, out = _run(tmp_path, trainset, cfg)
    assert out["resumed_from_step"] == 0 and len(out["history"]) == 6


def test_runs_of_other_configs_keep_their_checkpoints(tmp_path, trainset):
    assert _run(tmp_path, trainset, TrainParams(**CFG), stop_at=3) == (None, None)
    (other,) = (tmp_path / "ckpt").iterdir()
    _run(tmp_path, trainset, TrainParams(**{**CFG, "lr": 5e-4}))  # another config finishes in the same folder
    assert (other / LATEST).exists()


def nan_loss_from(step: int):
    """create_loss, whose loss turns NaN from the given step on (one call per step: accum_steps 1)."""
    real = loop.create_loss

    def factory(cfg, **kw):
        loss, calls = real(cfg, **kw), [0]

        def nan_loss(*args, **kwargs):
            calls[0] += 1
            out = loss(*args, **kwargs)
            return out * float("nan") if calls[0] >= step else out
        return nan_loss
    return factory


def test_a_nan_loss_stops_training_and_saves_nothing_nan(tmp_path, trainset, monkeypatch):
    monkeypatch.setattr(loop, "create_loss", nan_loss_from(4))
    cfg = TrainParams(**{**CFG, "checkpoint_every": 1})
    model, heads = _model()
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 4 \(1 step"):
        train(model, trainset, cfg, tmp_path, heads=heads)
    (run_dir,) = tmp_path.iterdir()
    ck = torch.load(run_dir / LATEST, weights_only=True)
    assert ck["step"] == 3 and not any(v.isnan().any() for v in ck["model"].values() if v.is_floating_point())


def test_skipped_nonfinite_steps_are_tolerated_up_to_the_limit(tmp_path, trainset, monkeypatch):
    monkeypatch.setattr(loop, "create_loss", nan_loss_from(5))  # steps 5 and 6: two in a row
    model, heads = _model()
    with pytest.raises(FloatingPointError, match="at step 6 .2 step"):
        train(model, trainset, TrainParams(**{**CFG, "max_nonfinite_steps": 1}), tmp_path / "a", heads=heads)
    model, heads = _model()
    train(model, trainset, TrainParams(**{**CFG, "max_nonfinite_steps": 2}), tmp_path / "b", heads=heads)
    assert all(torch.isfinite(v).all() for v in model.parameters())  # the NaN steps were skipped, not applied


def _model():
    from diht_core.models import ConceptHeads, create_model

    torch.manual_seed(0)
    model = create_model("diht-tiny-vit")[0]
    return model, ConceptHeads(model.visual.output_dim, 6, 4)


def test_a_nan_run_writes_no_model(tmp_path, monkeypatch):
    from diht_core.train.run import fit

    proj = _mini_project(tmp_path, {})
    monkeypatch.chdir(proj)
    monkeypatch.setattr(loop, "create_loss", nan_loss_from(2))
    with pytest.raises(FloatingPointError, match="step 2"):
        fit(load_params("params.yaml"), tmp_path / "ck")
    assert not (proj / "models").exists() and not (proj / "plots").exists()


@pytest.mark.parametrize("content, key", [
    ("train:\n  steps: 3\n  steps: 4\n", "duplicate key train.steps at line 3"),
    ("train: {compile: 'yes'}\n", "train.compile"),
    ("train: {model: no-such-model}\n", "train.model: unknown model config 'no-such-model'"),
    ("teacher: {arch: no_such}\n", "teacher.arch: unknown timm model 'no_such'"),
    (b"train: {model: caf\xe9}\n", "not UTF-8"),
])
def test_the_stage_cli_refuses_bad_params_in_one_line(tmp_path, content, key):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = subprocess.run([sys.executable, "-m", "tasks.cat_filter", "--params", str(bad)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and key in proc.stderr and not (tmp_path / "data").exists()
    if "compile" not in key:  # a schema error lists every bad key, one a line; the others are one line
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_project_params_give_known_names():
    from diht_core.models import check_names

    check_names(load_params(ROOT / "params.yaml"))
    check_names(load_params(ROOT / "params.yaml", yaml.safe_load((ROOT / "tests/data/tiny_params.yaml").read_text())))


def test_a_missing_input_names_the_stage_to_run_first(tiny_project):
    """No traceback: one line naming the missing file and the stage that writes it, before any work."""
    proc = subprocess.run([sys.executable, "-m", "tasks.concepts", "--params", "params.yaml"], cwd=tiny_project,
                          env=project_env(tiny_project), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 66, proc.stderr[-2000:]
    assert "run the cat_filter stage first" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tiny_project / "metrics").exists()
