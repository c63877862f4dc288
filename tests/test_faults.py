"""Fault injection: two runs of a stage at once; kill -9 at a seeded random moment of each stage, then a rerun:
every output equals that of an uninterrupted run, byte for byte. Each stage runs as its CLI
(`python -m tasks.<stage> --params params.yaml`), in a child forked from one process that imported the libraries once
(tests/helpers/stage_zygote.py); the kill goes to the child's process group when a seeded number of the stage's
outputs has appeared. DIHT_FAULT_SEED picks other moments."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, project_env, tiny_params
from diht_core.config import deep_merge

SEED = int(os.environ.get("DIHT_FAULT_SEED", "0"))
STAGES = ("download", "cat_filter", "concepts", "teacher", "pseudo_labels", "train", "benchmark")
# stage -> the outputs whose appearance can trigger the kill (globs under the project)
MARKERS = {
    "download": ["data/raw/train/*.tar", "data/raw/teacher/*.tar", "data/eval/*/*/*.tar"],
    "cat_filter": ["data/cat/decisions/*.parquet", "data/filtered/*.tar"],
    "teacher": ["data/teacher/teacher.pt", "data/teacher/features/*.npz"],
    "pseudo_labels": ["data/pseudo_labels/*.npz"],
    "train": [".state/checkpoints/train/*/latest.pt", ".state/checkpoints/train/*/previous.pt"],
    "benchmark": ["metrics/benchmark/*.json"],
}
OUTPUTS = ("data", "models", "metrics", "plots", ".state/checkpoints")
# the tests' tiny world made smaller still: two raw shards, a few eval images, six training steps
SMALLER = {
    "mlflow": {"registered_model": False},
    "download": {"num_train": 160, "teacher_samples": 96,
                 "eval": {"per_class": 4, "retrieval_images": 10, "vqa_questions": 10, "fewshot_per_class": 2}},
    "teacher": {"classifier_epochs": 2},
    "train": {"steps": 6, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2},
}


class Zygote:
    """Client of tests/helpers/stage_zygote.py."""

    def __init__(self, tmp: Path):
        env = project_env(tmp)
        (tmp / ".state" / "prefect").mkdir(parents=True, exist_ok=True)
        env.pop("DIHT_STATE_DIR")  # .state of each stage's working directory
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "stage_zygote.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        ready = self._reply()
        assert ready["threads"] == 1, ready  # forking a process with threads is not safe

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the stage zygote died"
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, stage: str, project: Path, log: str = "") -> int:
        return self._ask({"run": stage, "cwd": str(project), "params": "params.yaml",
                          "log": str(project / f"{stage}{log}.log")})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["rc"]

    def run(self, stage: str, project: Path) -> None:
        rc = self.wait(self.start(stage, project))
        assert rc == 0, f"{stage} exited {rc}:\n" + (project / f"{stage}.log").read_text()[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def tree(project: Path) -> dict[str, str]:
    """relative path -> sha256 of every output file (the lock file and the stages' logs are no outputs)."""
    out = {}
    for d in OUTPUTS:
        for f in sorted((project / d).rglob("*")):
            if f.is_file() and f.name != ".diht.lock":
                out[str(f.relative_to(project))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.log", "prefect"))
    (dst / ".state" / "prefect").mkdir(parents=True, exist_ok=True)
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of every stage; a copy of the project after each stage (snapshots[stage])."""
    root = tmp_path_factory.mktemp("faults")
    project = root / "reference"
    (project / ".state" / "prefect").mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(tiny_params(), SMALLER), sort_keys=False))
    zygote = Zygote(root)
    snapshots, seconds = {"": _copy(project, root / "snap-start")}, {}
    try:
        for stage in STAGES:
            t0 = time.monotonic()
            zygote.run(stage, project)
            seconds[stage] = round(time.monotonic() - t0, 1)
            snapshots[stage] = _copy(project, root / f"snap-{stage}")
        print(f"uninterrupted run, seconds per stage: {seconds}")
        yield {"root": root, "zygote": zygote, "snapshots": snapshots, "seconds": seconds}
    finally:
        zygote.close()


def kill_when(project: Path, pattern: str, count: int, pid: int, timeout: float = 300) -> None:
    """SIGKILL pid's process group once `count` files match pattern under project."""
    t0 = time.monotonic()
    while len(glob.glob(str(project / pattern))) < count:
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.002)
    os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(MARKERS))
def test_kill_9_then_rerun_gives_the_outputs_of_an_uninterrupted_run(reference, stage):
    snaps, zygote = reference["snapshots"], reference["zygote"]
    before = snaps[STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else ""]
    expected = tree(snaps[stage])
    project = _copy(before, reference["root"] / f"killed-{stage}")
    rng = random.Random(f"{SEED}-{stage}")
    pattern = rng.choice(MARKERS[stage])
    available = len([p for p in expected if fnmatch.fnmatch(p, pattern)])  # in the finished stage's outputs
    if stage == "train":  # checkpoints are gone when training ends: latest.pt at step 2, previous.pt at step 4
        available = 1
    count = rng.randint(1, max(1, available - 1))
    pid = zygote.start(stage, project, ".killed")
    kill_when(project, pattern, count, pid)
    rc = zygote.wait(pid)
    log = (project / f"{stage}.killed.log").read_text()
    assert rc == -signal.SIGKILL, f"{stage} ended (rc {rc}) before the kill at {count} x {pattern}:\n{log[-3000:]}"
    if stage == "train":  # the rerun resumes from the killed run's checkpoint, and still ends on the same bytes
        assert glob.glob(str(project / ".state/checkpoints/train/*/latest.pt"))
    zygote.run(stage, project)  # the rerun
    got = tree(project)
    assert sorted(got) == sorted(expected), (f"killed at {count} x {pattern}: extra "
                                             f"{sorted(set(got) - set(expected))}, missing "
                                             f"{sorted(set(expected) - set(got))}")
    differ = [p for p in expected if got[p] != expected[p]]
    assert not differ, f"{stage} killed at {count} x {pattern}: differ from the uninterrupted run: {differ}"


def test_a_killed_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    from diht_core.data.files import atomic_path, remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "a" / f".0.tar.{dead.stdout.strip()}-0123abcd.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a shard")
    (tmp_path / f".model.pt.{dead.stdout.strip()}-89abcdef.tmp").mkdir()  # atomic_torch_save's folder
    (tmp_path / ".notes.tmp").write_text("not ours")
    with atomic_path(tmp_path / "live.txt") as live:
        live.write_text("being written")
        assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(
            [stale.name, f".model.pt.{dead.stdout.strip()}-89abcdef.tmp"])
        assert live.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".notes.tmp", "a", "live.txt"]


def _cat_filter_kept(data: Path) -> tuple[list[str], dict]:
    import pandas as pd

    from diht_core.data.shards import read_samples, shard_paths

    kept = [s["key"] for shard in shard_paths(data / "filtered") for s in read_samples(shard)]
    decisions = pd.read_parquet(data / "cat" / "decisions.parquet")
    return kept, {"decided_kept": sorted(decisions.key[decisions.kept]), "in": len(decisions),
                  "reasons": decisions.reason.value_counts().to_dict()}


def test_two_cat_filter_runs_at_once_never_leave_metrics_that_disagree_with_the_shards(tiny_project):
    """Started together on one data folder with different params: one stops at once with the lock's message (exit
    75, naming the other) or they run one after the other; the metrics always describe the shards on disk."""
    from diht_core.config import load_params
    from diht_core.data.synthetic import write_source

    p = load_params(tiny_project / "params.yaml", {"download": {"num_train": 160}})
    write_source(p.download, p.seed, tiny_project / "data")
    other = yaml.safe_load((tiny_project / "params.yaml").read_text())
    other["cat_filter"].update(require_action=False, text_spotting=False)  # keeps far more
    (tiny_project / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    procs, ended = {}, {}
    for name in ("params.yaml", "other.yaml"):
        procs[name] = subprocess.Popen([sys.executable, "-m", "tasks.cat_filter", "--params", name], cwd=tiny_project,
                                       env=project_env(tiny_project), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while len(ended) < 2 and time.monotonic() - t0 < 600:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic()
        time.sleep(0.05)
    out = {name: (proc.returncode, *proc.communicate()) for name, proc in procs.items()}
    assert sorted(rc for rc, _, _ in out.values()) in ([0, 0], [0, 75]), out
    refused = [name for name, (rc, _, _) in out.items() if rc == 75]
    if refused:  # the refused run stopped at once: it did not wait for the other to finish
        (name,) = refused
        winner = next(n for n in procs if n != name)
        err = out[name][2]
        assert f"is in use by stage 'cat_filter' (pid {procs[winner].pid} on " in err and "Traceback" not in err, err
        assert ended[name] < ended[winner]
        last = winner
    else:
        last = max(ended, key=ended.get)
    data = tiny_project / "data"
    kept, decided = _cat_filter_kept(data)
    metrics = json.loads((tiny_project / "metrics" / "cat_filter.json").read_text())
    assert sorted(kept) == decided["decided_kept"]
    assert metrics["funnel"]["kept"] == len(kept) and metrics["funnel"]["in"] == decided["in"] == 160
    assert metrics["kept_fraction"] == len(kept) / 160
    for reason, n in decided["reasons"].items():
        assert metrics["funnel"].get(f"dropped_{reason}", metrics["funnel"]["kept"]) == n, reason
    # and they are the last run's: only params.yaml drops pairs for no action or spotted text
    strict = {"no_action", "text_spotted"} & set(decided["reasons"])
    assert bool(strict) == (last == "params.yaml"), (last, decided["reasons"])


def test_the_flow_takes_the_lock_stage_by_stage(tmp_path):
    """The flow runs each stage through its Prefect task, which holds the data folder's lock like the CLI does."""
    from diht_core.config import load_params
    from diht_core.data.lock import DataFolderBusy
    from flows.stages import TASKS

    from test_integrity import _hold

    paths = {k: str(tmp_path / k) for k in ("data", "models", "metrics", "plots")}
    params = load_params(ROOT / "params.yaml", {"paths": paths})
    holder = _hold(tmp_path / "data")
    try:
        for name, task in TASKS.items():
            with pytest.raises(DataFolderBusy, match=rf"in use by stage 'cat_filter' \(pid {holder.pid} "):
                task.fn(params)
    finally:
        holder.stdin.close()
        holder.wait()
    assert not (tmp_path / "metrics").exists()
