"""A bad-data corpus (bad JSON, missing and empty captions, a truncated JPEG, a 144-megapixel PNG header, a tar cut at
a header boundary) through CAT, both training loaders and the teacher features: every key kept or counted under its
reason, the cut shard reported, nothing crashes."""

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from conftest import project_env
from diht_core.config import TeacherParams, TrainParams
from diht_core.data.loader import make_loader
from diht_core.data.scenes import render, sample_scene
from diht_core.data.images import load_split
from diht_core.data.shards import encode_jpg, iter_shard, read_samples, write_shard
from diht_core.models import create_model

MAX_PIXELS = 89_478_485  # download.url_list.max_pixels
CAPTIONS = ["a red circle chases a blue star", "a blue star touches a red circle", "a green square pushes a red star"]
# key -> the reason it is dropped (CAT and training read captions; the teacher does not)
BAD = {"100": "bad_json", "101": "bad_json", "102": "bad_json", "103": "missing_caption", "104": "empty_caption",
       "105": "bad_image", "106": "too_many_pixels"}
CAPTION_FAULTS = {"missing_caption", "empty_caption"}


def _jpg(rng) -> bytes:
    return encode_jpg(render(sample_scene(rng, count=1), 64, rng))


def _big_png_header(width: int = 12000, height: int = 12000) -> bytes:
    """A tiny PNG whose IHDR says width x height (the pixels themselves are absent)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def _good(rng, key: str, caption: str) -> dict:
    return {"__key__": key, "jpg": _jpg(rng), "txt": caption, "json": json.dumps({"noise": "clean"}).encode()}


def make_corpus(directory) -> dict:
    """raw shards 0.tar (3 good + every bad sample) and 1.tar (cut at a header boundary after its first sample);
    returns {"good": keys that survive, "lost": keys after the cut}."""
    rng = np.random.default_rng(0)
    good = [_good(rng, f"00{i}", c) for i, c in enumerate(CAPTIONS)]
    jpg = _jpg(rng)
    bad = [
        {"__key__": "100", "jpg": jpg, "txt": CAPTIONS[0], "json": b"{not json"},
        {"__key__": "101", "jpg": jpg, "txt": CAPTIONS[0], "json": b"[1, 2]"},
        {"__key__": "102", "jpg": jpg, "txt": CAPTIONS[0], "json": b'{"noise": "\xff\xfe"}'},
        {"__key__": "103", "jpg": jpg, "json": b"{}"},
        {"__key__": "104", "jpg": jpg, "txt": "  ", "json": b"{}"},
        {"__key__": "105", "jpg": jpg[: len(jpg) // 2], "txt": CAPTIONS[1], "json": b"{}"},
        {"__key__": "106", "png": _big_png_header(), "txt": CAPTIONS[1], "json": b"{}"},
    ]
    write_shard(directory / "0.tar", good + bad)
    more = [_good(rng, f"20{i}", c) for i, c in enumerate(CAPTIONS)]
    write_shard(directory / "1.tar", more)
    with tarfile.open(directory / "1.tar") as tar:
        cut = tar.getmembers()[3].offset  # the header of the second sample's first member
    data = (directory / "1.tar").read_bytes()
    (directory / "1.tar").write_bytes(data[:cut])
    return {"good": [s["__key__"] for s in good] + ["200"], "lost": ["201", "202"]}


def test_reader_groups_as_webdataset_and_reports_the_cut(tmp_path):
    corpus = make_corpus(tmp_path)
    ours = list(iter_shard(tmp_path / "0.tar"))
    theirs = list(wds.WebDataset(str(tmp_path / "0.tar"), shardshuffle=False, empty_check=False))
    assert [{k: v for k, v in s.items() if k != "__local_path__"} for s in theirs] == ours
    faults = {s["key"]: s["fault"] for s in read_samples(tmp_path / "0.tar", MAX_PIXELS, need_caption=True)}
    assert faults == {**dict.fromkeys(corpus["good"][:3]), **BAD}
    cut = list(read_samples(tmp_path / "1.tar", MAX_PIXELS))
    assert [s["key"] for s in cut] == ["200", None]
    assert cut[-1]["fault"] == "truncated" and cut[-1]["read"] == 1 and "end-of-archive" in cut[-1]["error"]
    # cut inside a member: the same report, the samples before the cut intact
    (tmp_path / "2.tar").write_bytes((tmp_path / "0.tar").read_bytes()[:4000])
    tail = list(read_samples(tmp_path / "2.tar"))[-1]
    assert tail["fault"] == "truncated" and tail["read"] >= 1
    # generated benchmark data: a fault is an error naming the shard and the key
    with pytest.raises(ValueError, match=r"0\.tar sample '100': bad_json"):
        load_split(tmp_path, 32)


def test_cat_filter_stage_accounts_for_every_key(tiny_project):
    raw = tiny_project / "data" / "raw" / "train"
    raw.mkdir(parents=True)
    corpus = make_corpus(raw)
    res = subprocess.run([sys.executable, "-m", "tasks.cat_filter", "--params", "params.yaml"], cwd=tiny_project,
                         env=project_env(tiny_project), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "1.tar is truncated after 1 samples" in res.stdout + res.stderr
    df = pd.read_parquet(tiny_project / "data" / "cat" / "decisions.parquet").set_index("key")
    assert sorted(df.index) == sorted(corpus["good"] + list(BAD))
    assert df.reason[list(BAD)].to_dict() == BAD and not df.kept[list(BAD)].any()
    kept = [s["key"] for shard in sorted((tiny_project / "data" / "filtered").glob("*.tar"))
            for s in read_samples(shard)]
    assert sorted(kept) == sorted(df.index[df.kept])
    assert not set(kept) & set(BAD)
    metrics = json.loads((tiny_project / "metrics" / "cat_filter.json").read_text())
    assert metrics["funnel"]["in"] == len(df)
    for reason in set(BAD.values()):
        assert metrics["funnel"][f"dropped_{reason}"] == list(BAD.values()).count(reason)
    assert metrics["truncated_shards"]["1.tar"]["read"] == 1


def _by_reason(with_captions: bool) -> dict:
    out: dict = {}
    for reason in BAD.values():
        if with_captions or reason not in CAPTION_FAULTS:
            out[reason] = out.get(reason, 0) + 1
    return out


def test_in_memory_loader_counts_faults_by_reason(tmp_path):
    from diht_core.train import load_train_set

    corpus = make_corpus(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    ts = load_train_set(tmp_path, 32, tok, MAX_PIXELS)
    assert sorted(ts.keys) == sorted(corpus["good"])
    assert ts.faults.by_reason == _by_reason(True) and ts.skipped == len(BAD)
    assert ts.faults.truncated["1.tar"]["read"] == 1


def test_in_memory_loader_all_skipped(tmp_path):
    from diht_core.train import load_train_set

    _, _, tok = create_model("diht-tiny-vit")
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "0.tar", [{"__key__": "x", "jpg": b"not an image", "txt": CAPTIONS[0]}])
    write_shard(tmp_path / "1.tar", [_good(rng, "g", CAPTIONS[0])])  # a shard whose samples are all bad is fine
    assert load_train_set(tmp_path, 32, tok, MAX_PIXELS).keys == ["g"]
    (tmp_path / "1.tar").unlink()
    with pytest.raises(ValueError, match=r"no training sample left .*'bad_image': 1"):
        load_train_set(tmp_path, 32, tok, MAX_PIXELS)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_loader_counts_faults_by_reason(tmp_path, workers):
    from diht_core.train import StreamingData

    corpus = make_corpus(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    batches = list(make_loader(tmp_path, 32, tok, 2, MAX_PIXELS, 1, TrainParams(workers=workers)))
    assert sorted(k for b in batches for k in b["key"]) == sorted(corpus["good"])
    by_reason: dict = {}
    for b in batches:
        for r, n in b["skipped_by_reason"].items():
            by_reason[r] = by_reason.get(r, 0) + n
    assert by_reason == _by_reason(True) and sum(b["skipped"] for b in batches) == len(BAD)
    assert [b["truncated"]["1.tar"]["read"] for b in batches if b["truncated"]] == [1]
    cfg = TrainParams(workers=workers)
    data = StreamingData(lambda seed, bs: make_loader(tmp_path, 32, tok, bs, MAX_PIXELS, seed, cfg),
                         "fp", distill=False)
    assert len(list(data.batches(TrainParams(seed=0, steps=2, batch_size=2), 0))) == 2
    assert data.faults.by_reason and data.skipped == sum(data.faults.by_reason.values())


def test_streaming_loader_all_skipped_is_a_clear_error(tmp_path):
    from diht_core.train import StreamingData

    _, _, tok = create_model("diht-tiny-vit")
    write_shard(tmp_path / "0.tar", [{"__key__": f"{i}", "jpg": b"bad", "txt": CAPTIONS[0]} for i in range(3)])
    cfg = TrainParams(workers=0)
    data = StreamingData(lambda seed, bs: make_loader(tmp_path, 32, tok, bs, MAX_PIXELS, seed, cfg), "fp",
                         distill=False)
    with pytest.raises(RuntimeError, match=r"no batch: skipped by reason \{'bad_image': 3\}"):
        list(data.batches(TrainParams(seed=0, steps=2, batch_size=2), 0))


def test_teacher_features_count_faults_by_reason(tmp_path):
    from diht_core.concepts.features import cached_features
    from diht_core.concepts.teacher import build_teacher, freeze

    corpus = make_corpus(tmp_path / "shards")
    t = TeacherParams(arch="test_resnet", image_size=32)
    model = freeze(build_teacher(t.arch))
    teacher_file = tmp_path / "teacher.pt"
    teacher_file.write_bytes(b"weights")
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    keys, feats, reused, faults = cached_features(model, shards, tmp_path / "cache", teacher_file, t, MAX_PIXELS)
    captionless = [k for k, r in BAD.items() if r in CAPTION_FAULTS]  # the teacher reads no caption
    assert sorted(keys) == sorted(corpus["good"] + captionless) and len(feats) == len(keys) and reused == 0
    assert faults.by_reason == _by_reason(False) and faults.truncated["1.tar"]["read"] == 1
    again = cached_features(model, shards, tmp_path / "cache", teacher_file, t, MAX_PIXELS)
    assert again[0] == keys and again[2] == 2  # the counts come back with the cache
    assert again[3].by_reason == faults.by_reason and again[3].truncated == faults.truncated


def test_benchmark_counts_bad_samples_per_task_and_scores_the_rest(tmp_path):
    """A synthetic classification split holding bad json, a truncated JPEG, a 144-megapixel PNG header and a cut
    shard: the task runs on the good samples and reports each skipped one under its reason."""
    from diht_core.eval.runner import run_task

    rng = np.random.default_rng(0)
    task = tmp_path / "eval" / "synthetic_shape"
    (task / "test").mkdir(parents=True)
    (task / "classnames.txt").write_text("circle\nsquare\n")
    (task / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    jpg = _jpg(rng)
    good = [{"__key__": f"g{i}", "jpg": _jpg(rng), "cls": str(i % 2)} for i in range(4)]
    bad = [{"__key__": "b0", "jpg": jpg, "cls": "0", "json": b"{not json"},
           {"__key__": "b1", "jpg": jpg[: len(jpg) // 2], "cls": "1"},
           {"__key__": "b2", "png": _big_png_header(), "cls": "0"},
           {"__key__": "b3", "cls": "1"}]
    write_shard(task / "test" / "0.tar", good[:2] + bad)
    write_shard(task / "test" / "1.tar", good[2:])
    with tarfile.open(task / "test" / "1.tar") as tar:
        cut = tar.getmembers()[2].offset  # the second sample's header
    (task / "test" / "1.tar").write_bytes((task / "test" / "1.tar").read_bytes()[:cut])
    model, preprocess, tok = create_model("diht-tiny-vit")
    r = run_task("synthetic_shape", model, preprocess, tok, tmp_path, max_pixels=MAX_PIXELS)
    assert r["skipped_samples"] == 4
    assert r["skipped_by_reason"] == {"bad_json": 1, "bad_image": 2, "too_many_pixels": 1}
    assert r["truncated_shards"]["1.tar"]["read"] == 1
    clean = tmp_path / "clean"
    (clean / "eval" / "synthetic_shape" / "test").mkdir(parents=True)
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (clean / "eval" / "synthetic_shape" / f).write_bytes((task / f).read_bytes())
    write_shard(clean / "eval" / "synthetic_shape" / "test" / "0.tar", good[:3])
    ok = run_task("synthetic_shape", model, preprocess, tok, clean, max_pixels=MAX_PIXELS)
    assert "skipped_samples" not in ok  # a clean task's metrics are as they always were
    # scored on g0, g1, g2: the metrics of a split holding only them
    assert {k: v for k, v in r.items() if not k.startswith(("skipped", "truncated"))} == pytest.approx(
        ok, rel=0, abs=0, nan_ok=True)
