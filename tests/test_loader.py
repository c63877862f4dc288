import json
import os
import threading

import numpy as np
import pytest
import torch

from diht_core.config import TrainParams
from diht_core.data.loader import make_loader
from diht_core.data.pseudo_labels import SparsePseudoLabels
from diht_core.data.scenes import render, sample_scene
from diht_core.data.shards import encode_jpg, write_shard
from diht_core.models import create_model
from diht_core.data.pseudo_labels import save_shard

N_OBJ, N_ATTR = 12, 8
MAX_PIXELS = 89_478_485  # download.url_list.max_pixels


def _setup(tmp_path, n_shards=4, per_shard=10, drop=()):
    rng = np.random.default_rng(0)
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s * per_shard + i:09d}"
            sc = sample_scene(rng, count=1)
            samples.append({"__key__": key, "jpg": encode_jpg(render(sc, 32, rng)), "txt": "a red circle",
                            "json": json.dumps({"captions": ["a red circle", "a circle"]}).encode()})
            keys.append(key)
        write_shard(tmp_path / "shards" / f"{s}.tar", samples)
    # the pseudo-label of key k puts its top mass on object k % N_OBJ and attribute k % N_ATTR
    kept = [k for k in keys if k not in drop]
    n = np.array([int(k) for k in kept])
    obj = (np.stack([n % N_OBJ, (n + 1) % N_OBJ], 1).astype(np.int32), np.tile([0.75, 0.25], (len(n), 1)).astype(np.float16))
    attr = (np.stack([n % N_ATTR], 1).astype(np.int32), np.ones((len(n), 1), np.float16))
    save_shard(tmp_path / "pl" / "0.npz", kept, obj, attr)
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_join_is_correct_on_shuffled_shards(tmp_path, workers):
    keys = _setup(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    pl = SparsePseudoLabels(tmp_path / "pl", N_OBJ, N_ATTR)
    loader = make_loader(tmp_path / "shards", 32, tok, batch_size=7, max_pixels=MAX_PIXELS, seed=3,
                         cfg=TrainParams(workers=workers), pseudo=pl)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["text"].shape[0] == len(batch["key"])
        for key, obj, attr in zip(batch["key"], batch["obj"], batch["attr"]):
            k = int(key)
            assert obj[k % N_OBJ] == pytest.approx(0.75, abs=1e-3) and obj.sum() == pytest.approx(1.0, abs=1e-3)
            assert attr[k % N_ATTR] == 1.0
        seen += batch["key"]
    assert sorted(seen) == keys            # every sample exactly once
    assert seen != keys                    # and not in file order


def test_workers_survive_the_thread_exit_hooks_of_their_parent(tmp_path):
    """A thread-exit hook of the parent that fails in a forked child (as Prefect's log and event services do once a
    flow has run in the process) must not end the DataLoader workers with exit code 1."""
    keys = _setup(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    parent = os.getpid()

    def fails_in_a_child():
        assert os.getpid() == parent, "a parent's thread-exit hook ran in a forked worker"

    threading._register_atexit(fails_in_a_child)
    try:
        loader = make_loader(tmp_path / "shards", 32, tok, batch_size=7, max_pixels=MAX_PIXELS, seed=3,
                             cfg=TrainParams(workers=2), pseudo=SparsePseudoLabels(tmp_path / "pl", N_OBJ, N_ATTR))
        for _ in range(2):  # two epochs: every worker exits twice
            assert sorted(k for b in loader for k in b["key"]) == keys
    finally:
        threading._threading_atexits[:] = [h for h in threading._threading_atexits if h.func is not fails_in_a_child]


def test_missing_pseudo_label_is_an_error_or_a_counted_skip(tmp_path):
    _setup(tmp_path, drop={"000000013", "000000027"})
    _, _, tok = create_model("diht-tiny-vit")
    pl = SparsePseudoLabels(tmp_path / "pl", N_OBJ, N_ATTR)
    with pytest.raises(KeyError, match="no pseudo-label"):
        for _ in make_loader(tmp_path / "shards", 32, tok, 8, MAX_PIXELS, 0, TrainParams(workers=0), pseudo=pl,
                             missing="error"):
            pass
    batches = list(make_loader(tmp_path / "shards", 32, tok, 8, MAX_PIXELS, 0, TrainParams(workers=2), pseudo=pl,
                                   missing="skip"))
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(b["skipped_by_reason"].get("missing_pseudo_label", 0) for b in batches) == 2
    assert sum(len(b["key"]) for b in batches) == 38


@pytest.mark.parametrize("resample,workers", [(False, 0), (True, 2)])
def test_streaming_resume_replays_to_the_exact_next_batch(tmp_path, resample, workers):
    from diht_core.config import TrainParams
    from diht_core.train import StreamingData

    _setup(tmp_path)
    model, _, tok = create_model("diht-tiny-vit")

    def loader(seed, batch_size):
        return make_loader(tmp_path / "shards", 32, tok, batch_size, MAX_PIXELS, seed, shuffle_buffer=20,
                           cfg=TrainParams(workers=workers, resample=resample, captions_per_image=2, loss="sigmoid"))

    def data():
        return StreamingData(loader, "fp", distill=False, epoch_steps=5 if resample else None)

    cfg = TrainParams(seed=0, steps=14, batch_size=6, captions_per_image=2, loss="sigmoid")  # 40 samples: 7 batches an epoch, 2 epochs
    d = data()
    full, positions = [], []
    for b in d.batches(cfg, 0):
        full.append(b)
        positions.append(d.position)
    assert len(full) == 14 and all(b["text"].shape[0] == 2 * len(b["key"]) for b in full)
    assert full[0]["key"] != full[7]["key"]  # epochs differ
    stop = 9  # killed after 9 steps: the checkpoint holds the position after the 9th batch
    resumed = list(data().batches(cfg, stop, position=positions[stop - 1]))
    assert len(resumed) == 14 - stop
    for a, b in zip(full[stop:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
