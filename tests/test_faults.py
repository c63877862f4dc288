"""Fault injection: kill -9 at a seeded random moment of each stage, then a rerun: every output equals that of an
uninterrupted run, byte for byte. Each stage runs as its CLI (`python -m tasks.<stage> --params params.yaml`), in a
child forked from one process that imported the libraries once (tests/helpers/stage_zygote.py); the kill goes to the
child's process group when a seeded number of the stage's outputs has appeared. DIHT_FAULT_SEED picks other moments."""

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

pytestmark = pytest.mark.slow
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


class Zygote:
    """Client of tests/helpers/stage_zygote.py."""

    def __init__(self, tmp: Path):
        env = project_env(tmp)
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

    def start(self, stage: str, project: Path) -> int:
        return self._ask({"run": stage, "cwd": str(project), "params": "params.yaml",
                          "log": str(project / f"{stage}.log")})["pid"]

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
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    zygote = Zygote(root)
    snapshots, seconds = {"": _copy(project, root / "snap-start")}, {}
    try:
        for stage in STAGES:
            t0 = time.monotonic()
            zygote.run(stage, project)
            seconds[stage] = time.monotonic() - t0
            snapshots[stage] = _copy(project, root / f"snap-{stage}")
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


@pytest.mark.parametrize("stage", list(MARKERS))
def test_kill_9_then_rerun_gives_the_outputs_of_an_uninterrupted_run(reference, stage):
    snaps, zygote = reference["snapshots"], reference["zygote"]
    before = snaps[STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else ""]
    expected = tree(snaps[stage])
    project = _copy(before, reference["root"] / f"killed-{stage}")
    rng = random.Random(f"{SEED}-{stage}")
    pattern = rng.choice(MARKERS[stage])
    available = len([p for p in expected if fnmatch.fnmatch(p, pattern)])  # in the finished stage's outputs
    if stage == "train":  # checkpoints are gone when training ends: latest.pt at step 5, previous.pt at step 10
        available = 1
    count = rng.randint(1, max(1, available - 1))
    pid = zygote.start(stage, project)
    kill_when(project, pattern, count, pid)
    rc = zygote.wait(pid)
    log = (project / f"{stage}.log").read_text()
    assert rc == -signal.SIGKILL, f"{stage} ended (rc {rc}) before the kill at {count} x {pattern}:\n{log[-3000:]}"
    zygote.run(stage, project)  # the rerun
    got = tree(project)
    assert sorted(got) == sorted(expected), (f"killed at {count} x {pattern}: extra "
                                             f"{sorted(set(got) - set(expected))}, missing "
                                             f"{sorted(set(expected) - set(got))}")
    differ = [p for p in expected if got[p] != expected[p]]
    assert not differ, f"{stage} killed at {count} x {pattern}: differ from the uninterrupted run: {differ}"
