"""Stage `teacher`: a frozen teacher (timm, open_clip or torchvision), its cached features (in this process or on
torchrun ranks: `teacher.launcher`), and the two concept classifiers (in this process, on every shard's features)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from diht_core.eval.encoders import encode_images
from diht_core.concepts.features import cached_features, extract_rank_share, split_probe_accuracy
from diht_core.concepts.teacher import (features, fit_teacher, freeze, load_teacher, load_teacher_split,
                                        predicts_labels, train_classifiers)
from diht_core.data.files import atomic_torch_save
from diht_core.data.shards import Faults, shard_paths
from diht_core.launch import launch_torchrun, launched_by_torchrun, local_world_size, pick_device
from diht_core.models import create_model, image_size

from ._ranks import rank_args, write_result
from ._stage import STATE_DIR, cli, make_task


def body(p, run) -> dict:
    t = p.teacher
    data = Path(p.paths.data)
    out = data / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    max_pixels = p.download.url_list.max_pixels  # the one pixel limit of every stage that reads images
    model, pre = load_teacher(t)
    print(f"[teacher] {t.arch}: preprocessing {pre.as_dict()}")
    losses, heldout_map, split_faults = [], None, None
    if t.weights is None or predicts_labels(model):  # the labelled split: to pre-train on, or to score the head
        images, labels, split_faults = load_teacher_split(data / "raw" / "teacher", pre, max_pixels)
        losses, heldout_map = fit_teacher(model, pre, t, images, labels, p.seed)
    else:
        freeze(model)
    atomic_torch_save(model.state_dict(), out / "teacher.pt")

    # teacher vs the student at step 0: the same linear probe on synthetic_shape features
    eval_dir = data / "eval" / "synthetic_shape"
    probe_faults = Faults()  # bad samples of the probe's data, counted once (the student reads the same)
    teacher_acc = split_probe_accuracy(lambda x: features(model, pre, x), eval_dir, pre.to_uint8, max_pixels,
                                       probe_faults)
    student, _, _ = create_model(p.train.model)
    student_acc = split_probe_accuracy(lambda x: encode_images(student, x), eval_dir, image_size(student),
                                       max_pixels, Faults())

    # features of the filtered training set, cached per shard in fp16: on torchrun ranks (teacher.launcher), then
    # read back here, or in this process on teacher.device
    shards = shard_paths(data / "filtered")
    if t.launcher == "torchrun":
        ranks = local_world_size(t.nproc_per_node, t.device)
        counts = launch_torchrun(p, "tasks.teacher", ranks, STATE_DIR / "torchrun", {}, nnodes=t.nnodes,
                                 rdzv_endpoint=t.rdzv_endpoint)
        print(f"[teacher] features on torchrun ranks ({ranks} a machine x {t.nnodes}): {counts['extracted']} shards "
              f"extracted, {counts['reused']} reused from the cache")
    model.to(pick_device(t.device, 0, "teacher.device"))
    keys, feats, reused, faults = cached_features(model, shards, out / "features", out / "teacher.pt", t, max_pixels)
    if t.launcher == "none":
        print(f"[teacher] features: {len(shards) - reused} shards extracted, {reused} reused from the cache")

    # the two concept classifiers on frozen teacher features
    vocab = json.loads((data / "concepts" / "vocab.json").read_text())
    decisions = pd.read_parquet(data / "cat" / "decisions.parquet").set_index("key")
    classifiers, metrics_c = train_classifiers(feats, keys, decisions, vocab, t, p.seed)
    atomic_torch_save(classifiers, out / "classifiers.pt")
    for i, l in enumerate(losses):
        run.log_step(i + 1, {"pretrain_loss": l})
    probe = {"probe_skipped_by_reason": probe_faults.by_reason, "probe_truncated_shards": probe_faults.truncated}
    return {
        **({k: v for k, v in probe.items() if v}),  # only when the probe's data had a fault
        "arch": t.arch,
        "pretrained_here": t.weights is None,
        "preprocess": pre.as_dict(),
        "heldout_label_map": heldout_map,
        "shape_probe_acc_teacher": teacher_acc,
        "shape_probe_acc_student_step0": student_acc,
        "teacher_stronger_than_student": teacher_acc > student_acc,
        "classifiers": metrics_c,
        "split_skipped_by_reason": split_faults.by_reason if split_faults else None,  # None: the split was not read
        "split_truncated_shards": split_faults.truncated if split_faults else None,
        "skipped_by_reason": faults.by_reason,
        "truncated_shards": faults.truncated,
    }


def extract_on_rank() -> None:
    """A torchrun rank of `teacher.launcher: torchrun`: the features of its share of the shards."""
    p, result = rank_args("teacher")
    data = Path(p.paths.data)
    out = data / "teacher"
    write_result(result, extract_rank_share(p.teacher, shard_paths(data / "filtered"), out / "features",
                                            out / "teacher.pt", p.download.url_list.max_pixels))


teacher = make_task("teacher", body)

if __name__ == "__main__":
    extract_on_rank() if launched_by_torchrun() else cli("teacher", body)
