"""Teacher inference on torchrun ranks (teacher.launcher): shard i on rank i % world, each shard's file resumable,
the feature and pseudo-label files byte for byte those of one process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_params
from diht_core.concepts.features import cached_features, extract_features
from diht_core.concepts.pseudo_labels import label_shards, remove_stale
from diht_core.concepts.teacher import build_teacher, load_frozen_teacher
from diht_core.config import TeacherParams, load_params
from diht_core.launch import DistInfo, launch_torchrun, local_world_size, rank_share

MAX_PIXELS = tiny_params()["download"]["url_list"]["max_pixels"]  # what the stage passes
TEACHER = {"arch": "test_resnet", "image_size": 32, "device": "cpu", "feature_batch_size": 4,
           "launcher": "torchrun", "nproc_per_node": 2}


def _data(root: Path, n_shards: int = 5, per_shard: int = 6) -> Path:
    """Filtered shards (one sample with a broken image), a teacher.pt pre-trained here (random test_resnet) and
    classifiers.pt: what the features and the pseudo-labels read."""
    from diht_core.data.scenes import render, sample_scene
    from diht_core.data.shards import encode_jpg, write_shard

    rng = np.random.default_rng(0)
    for s in range(n_shards):
        samples = [{"__key__": f"{s}{i:04d}", "jpg": encode_jpg(render(sample_scene(rng), 48, rng)), "txt": "a cap"}
                   for i in range(per_shard)]
        if s == 1:
            samples[2]["jpg"] = b"not a jpeg"
        write_shard(root / "filtered" / f"{s:05d}.tar", samples)
    torch.manual_seed(0)
    teacher = build_teacher("test_resnet")
    (root / "teacher").mkdir(parents=True)
    torch.save(teacher.state_dict(), root / "teacher" / "teacher.pt")
    classifiers = {}
    for kind, n in (("objects", 7), ("attributes", 5)):
        lin = torch.nn.Linear(teacher.num_features, n)
        classifiers[kind] = {"state_dict": lin.state_dict(), "names": [f"{kind}{i}" for i in range(n)]}
    torch.save(classifiers, root / "teacher" / "classifiers.pt")
    return root


def _one_process(data: Path, t: TeacherParams) -> None:
    from diht_core.concepts.teacher import load_classifiers

    model, _ = load_frozen_teacher(t, data / "teacher" / "teacher.pt")
    shards = sorted((data / "filtered").glob("*.tar"))
    cached_features(model, shards, data / "teacher" / "features", data / "teacher" / "teacher.pt", t, MAX_PIXELS)
    heads, _ = load_classifiers(data / "teacher" / "classifiers.pt")
    features = sorted((data / "teacher" / "features").glob("*.npz"))
    label_shards(heads, features, data / "pseudo_labels", 3, data / "teacher" / "classifiers.pt")


def _reference_and_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """(one: the files of one process on as many threads as a CPU rank, two: the same inputs without features)."""
    one = _data(tmp_path / "one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun gives each CPU rank: CPU kernels may round differently on 2 threads
    try:
        _one_process(one, TeacherParams(**{**TEACHER, "launcher": "none"}))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    shutil.copytree(one / "filtered", two / "filtered")
    shutil.copytree(one / "teacher", two / "teacher", ignore=shutil.ignore_patterns("features"))
    return one, two


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.npz"))}


def test_shards_go_to_rank_i_mod_world():
    items = list(range(7))
    shares = [rank_share(items, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert rank_share(items, DistInfo()) == items
    assert local_world_size(3, "auto") == 3
    assert local_world_size("auto", "cpu") == len(os.sched_getaffinity(0))


def test_params_of_teacher_inference():
    from diht_core.config import ParamsError, validate_params

    assert validate_params({"teacher": {"nproc_per_node": 4}}).teacher.nproc_per_node == 4
    for bad in ({"nproc_per_node": 0}, {"launcher": "dask"}, {"device": "gpu"}, {"feature_batch_size": 0},
                {"nnodes": 2, "launcher": "torchrun"}, {"nnodes": 2, "rdzv_endpoint": "head:29500"}):
        with pytest.raises(ParamsError, match="teacher"):
            validate_params({"teacher": bad})


def test_feature_and_label_files_resume_shard_by_shard(tmp_path):
    """A shard whose file is there and valid is skipped; a missing, stale or truncated one is redone, and the
    files end byte for byte as an uninterrupted run's."""
    t = TeacherParams(**{**TEACHER, "launcher": "none"})
    data = _data(tmp_path / "a", n_shards=3, per_shard=3)
    _one_process(data, t)
    feats, labels = data / "teacher" / "features", data / "pseudo_labels"
    whole_f, whole_l = _files(feats), _files(labels)
    (feats / "00001.npz").unlink()
    (feats / "00002.npz").write_bytes(whole_f["00002.npz"][:100])  # killed mid-write without the atomic rename
    (labels / "00000.npz").unlink()
    model, pre = load_frozen_teacher(t, data / "teacher" / "teacher.pt")
    shards = sorted((data / "filtered").glob("*.tar"))
    counts = extract_features(model, pre, shards, feats, data / "teacher" / "teacher.pt", t, MAX_PIXELS)
    assert counts == {"extracted": 2, "reused": 1} and _files(feats) == whole_f
    from diht_core.concepts.teacher import load_classifiers

    heads, _ = load_classifiers(data / "teacher" / "classifiers.pt")
    clf = data / "teacher" / "classifiers.pt"
    assert label_shards(heads, sorted(feats.glob("*.npz")), labels, 3, clf) == {"written": 1, "reused": 2}
    assert _files(labels) == whole_l
    assert label_shards(heads, sorted(feats.glob("*.npz")), labels, 4, clf) == {"written": 3, "reused": 0}
    (feats / "00002.npz").unlink()
    remove_stale(feats, labels)
    assert sorted(_files(labels)) == ["00000.npz", "00001.npz"]


@pytest.mark.slow
def test_two_cpu_ranks_write_the_files_of_one_process(tmp_path):
    """teacher.launcher: torchrun on 2 CPU ranks (gloo): the features and pseudo-labels of 5 shards (3 on rank 0, 2
    on rank 1; one valid cache and one stale cache already there) are byte for byte the files of one process on
    as many threads as a rank (torchrun's OMP_NUM_THREADS=1)."""
    one, two = _reference_and_inputs(tmp_path)
    (two / "teacher" / "features").mkdir()
    shutil.copy(one / "teacher" / "features" / "00003.npz", two / "teacher" / "features")  # done before a kill
    shutil.copy(one / "teacher" / "features" / "00001.npz", two / "teacher" / "features" / "00000.npz")  # stale
    params = tiny_params()
    params["paths"] = {k: str(tmp_path / k) for k in ("models", "metrics", "plots")} | {"data": str(two)}
    params["teacher"].update(TEACHER)
    params["pseudo_labels"]["top_k"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(tmp_path / "params.yaml")
    counts = launch_torchrun(p, "tasks.teacher", 2, tmp_path / "runs", {})
    assert counts == {"extracted": 4, "reused": 1}
    assert _files(two / "teacher" / "features") == _files(one / "teacher" / "features")
    counts = launch_torchrun(p, "tasks.pseudo_labels", 2, tmp_path / "runs", {})
    assert counts == {"written": 5, "reused": 0}
    assert _files(two / "pseudo_labels") == _files(one / "pseudo_labels")


@pytest.mark.slow
def test_two_machines_write_the_files_of_one_process(tmp_path):
    """teacher.nnodes: 2: the stage's launch on this machine (c10d rendezvous at teacher.rdzv_endpoint) and a
    torchrun started by hand as on another machine (here a second launch on this one, meeting at a loopback
    endpoint, one CPU rank each) extract the features, then the pseudo-labels, of the shared shards: each machine
    its share, the counts summed over both, the files byte for byte one process's."""
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    one, two = _reference_and_inputs(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    params = tiny_params()
    params["paths"] = {k: str(tmp_path / k) for k in ("models", "metrics", "plots")} | {"data": str(two)}
    params["teacher"].update({**TEACHER, "nnodes": 2, "rdzv_endpoint": endpoint})
    params["pseudo_labels"]["top_k"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(tmp_path / "params.yaml")
    project = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # the one process's threads (torchrun sets it only for several ranks a machine)

    def on_two_machines(module: str) -> dict:
        # is_host=0: what torchrun infers on another machine (its host name is not the endpoint's); here, on the
        # same machine, it would otherwise race head for the rendezvous port
        other = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                                  "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-conf=is_host=0",
                                  "-m", module,
                                  "--params", str(tmp_path / "params.yaml")], env=env, cwd=project)
        with ThreadPoolExecutor(1) as pool:
            head = pool.submit(launch_torchrun, p, module, 1, tmp_path / "runs", {"OMP_NUM_THREADS": "1"},
                               nnodes=2, rdzv_endpoint=endpoint)
            assert other.wait(timeout=600) == 0
            return head.result(timeout=600)

    assert on_two_machines("tasks.teacher") == {"extracted": 5, "reused": 0}
    assert _files(two / "teacher" / "features") == _files(one / "teacher" / "features")
    assert on_two_machines("tasks.pseudo_labels") == {"written": 5, "reused": 0}
    assert _files(two / "pseudo_labels") == _files(one / "pseudo_labels")
