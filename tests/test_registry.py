"""The task registry and the dataset loaders, on tiny datasets built in tmp dirs (no downloads)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from diht_core.data.eval_datasets import (DEFAULT_TEMPLATES, DatasetNotFound, LazyImages, load_cc_validation,
                                          load_imagefolder, load_karpathy_json, load_wds_classification,
                                          load_wds_retrieval, load_wds_vqa)
from diht_core.data.shards import Faults
from diht_core.eval.registry import (TaskSpec, check_available, default_tasks, diht_tasks, get_task, list_tasks,
                                     register_task, resolve)

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["synthetic_shape", "synthetic_colour", "synthetic_count", "synthetic_retrieval", "synthetic_vqa",
             "synthetic_compositional"]
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)]


def img_bytes(colour, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_wds(split_dir: Path, shards: list[list[dict]]) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(shards):
        with wds.TarWriter(str(split_dir / f"{i}.tar")) as sink:
            for s in samples:
                sink.write(s)
    (split_dir / "nshards.txt").write_text(f"{len(shards)}\n")


def make_wds_classification(root: Path) -> None:
    """2 classes, 2 shards, mixed image formats."""
    write_wds(root / "test", [
        [{"__key__": "s0", "png": img_bytes(COLOURS[0]), "cls": b"0"},
         {"__key__": "s1", "webp": img_bytes(COLOURS[1], "WEBP"), "cls": b"1"}],
        [{"__key__": "s2", "jpg": img_bytes(COLOURS[0], "JPEG"), "cls": b"0"}],
    ])
    (root / "classnames.txt").write_text("red square\nblue square\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")


def make_wds_retrieval(root: Path) -> None:
    write_wds(root / "test", [[
        {"__key__": "a", "jpg": img_bytes(COLOURS[0], "JPEG"), "txt": "a red square\na red block\n"},
        {"__key__": "b", "png": img_bytes(COLOURS[1]), "txt": "a blue square"},
        {"__key__": "c", "png": img_bytes(COLOURS[2]), "txt": "green one\ngreen two\ngreen three"},
    ]])
    (root / "dataset_type.txt").write_text("retrieval\n")


# --------------------------------------------------------------------------- the registry


def test_registry_counts():
    real = list_tasks(synthetic=False, extra=False)
    assert len(list_tasks("classification", synthetic=False, extra=False)) == 17
    assert len(list_tasks("retrieval", synthetic=False, extra=False)) == 10
    assert len(list_tasks("vqa", synthetic=False, extra=False)) == 2
    assert len(real) == 29 and len(set(real)) == 29 and real == diht_tasks()
    assert default_tasks() == SYNTHETIC == list_tasks(synthetic=True)
    assert list_tasks(extra=True) == ["cc_val_t2i", "cc_val_i2t"]  # outside the 29
    assert len(list_tasks()) == 29 + 2 + 6
    for name in ("imagenet1k", "coco_t2i", "coco_i2t", "flickr30k_t2i", "flickr30k_i2t"):  # named in the paper
        assert name in real


def test_every_spec_is_complete():
    for name in list_tasks():
        s = get_task(name)
        assert isinstance(s, TaskSpec) and s.name == name
        assert s.kind in ("classification", "retrieval", "vqa")
        assert s.main_metric and s.default_path and s.layout and s.notes and callable(s.loader)
        if s.kind == "classification":
            assert s.main_metric in ("acc1", "mean_per_class_recall")
        if s.kind == "retrieval" and not s.synthetic:
            assert s.main_metric in ("image_retrieval_recall@1", "text_retrieval_recall@1")
            assert s.caption_template == "a photo of {}."
            assert s.wrap_captions(["a dog"]) == ["a photo of a dog."]
        if s.kind == "vqa":
            assert s.main_metric == "accuracy"
    assert get_task("coco_t2i").main_metric == "image_retrieval_recall@1"
    assert get_task("coco_i2t").main_metric == "text_retrieval_recall@1"
    assert get_task("coco_t2i").default_path == "coco/coco_test.json"
    assert get_task("flickr30k_i2t").default_path == "flickr30k/flickr30k_test.json"
    assert get_task("imagenet1k").default_path == "wds/imagenet1k"
    assert get_task("cc_val_t2i").block_size == 2000
    assert get_task("fgvc_aircraft").main_metric == "mean_per_class_recall"


def test_synthetic_metrics_match_benchmark():
    from diht_core.eval.catalog import SYNTHETIC as ROWS  # the one list the runner's main metrics come from

    MAIN_METRIC = {name: metric for name, _, metric in ROWS}

    assert {n: get_task(n).main_metric for n in SYNTHETIC} == MAIN_METRIC


def test_docs_list_every_task():
    doc = (ROOT / "docs" / "benchmark_tasks.md").read_text()
    assert "Where this departs from the paper" in doc
    for name in list_tasks():
        assert f"`{name}`" in doc, name


def test_get_task_errors():
    with pytest.raises(ValueError, match="imagenet1k"):
        get_task("imagenet")
    with pytest.raises(ValueError, match="coco_t2i"):
        get_task("coco_t2")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("zzzzzz")
    with pytest.raises(ValueError):
        list_tasks("segmentation")


def test_register_task_rejects_bad_specs():
    with pytest.raises(ValueError, match="already registered"):
        register_task(get_task("mnist"))
    bad = TaskSpec(name="bad", kind="detection", main_metric="map", loader=lambda r: {}, default_path="x", layout="x")
    with pytest.raises(ValueError, match="kind"):
        register_task(bad)
    assert "bad" not in list_tasks()


# --------------------------------------------------------------------------- loaders


def test_load_wds_classification(tmp_path):
    make_wds_classification(tmp_path / "ds")
    d = load_wds_classification(tmp_path / "ds", "test")
    assert d["labels"].dtype == torch.long and d["labels"].tolist() == [0, 1, 0]
    assert d["classnames"] == ["red square", "blue square"]
    assert d["templates"] == ["a photo of a {c}.", "a {c}."]
    imgs = d["images"]
    assert isinstance(imgs, LazyImages) and len(imgs) == 3
    assert imgs[0].mode == "RGB" and imgs[0].getpixel((4, 4)) == COLOURS[0]
    assert imgs[1].getpixel((4, 4))[2] > 200  # the webp sample is blue
    assert len(list(imgs)) == 3 and len(imgs[0:2]) == 2


def test_wds_classification_default_templates_and_bad_labels(tmp_path):
    root = tmp_path / "ds"
    make_wds_classification(root)
    (root / "zeroshot_classification_templates.txt").unlink()
    with pytest.warns(UserWarning, match="default"):
        assert load_wds_classification(root)["templates"] == DEFAULT_TEMPLATES
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="classes"):
        load_wds_classification(root)


def test_load_wds_retrieval(tmp_path):
    make_wds_retrieval(tmp_path / "ret")
    d = load_wds_retrieval(tmp_path / "ret", "test")
    assert d["captions"] == ["a red square", "a red block", "a blue square", "green one", "green two", "green three"]
    assert d["text_to_image"].tolist() == [0, 0, 1, 2, 2, 2]
    assert len(d["images"]) == 3 and d["images"][2].getpixel((0, 0)) == COLOURS[2]


def test_load_wds_vqa(tmp_path):
    q1 = {"question": "what colour?", "answers": ["red", "blue"], "label": 1, "qtype": "colour",
          "statements": ["a red square", "a blue square"]}
    q2 = {"question": "how many?", "answers": ["one", "two", "three"], "label": 0}
    write_wds(tmp_path / "vqa" / "test", [[
        {"__key__": "q1", "png": img_bytes(COLOURS[1]), "json": json.dumps(q1).encode()},
        {"__key__": "q2", "png": img_bytes(COLOURS[0]), "json": json.dumps(q2).encode()},
    ]])
    d = load_wds_vqa(tmp_path / "vqa")
    assert d["labels"].tolist() == [1, 0] and d["qtypes"] == ["colour", "all"]
    assert d["statements"][0] == ["a red square", "a blue square"]
    assert d["statements"][1][2] == "question: how many? answer: three"
    assert len(d["images"]) == 2


def test_load_imagefolder(tmp_path):
    root = tmp_path / "folder"
    for cls, colour in (("golden_retriever", COLOURS[0]), ("tabby_cat", COLOURS[1])):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(root / cls / f"{i}.jpg")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    d = load_imagefolder(root)
    assert d["classnames"] == ["golden retriever", "tabby cat"]
    assert d["labels"].tolist() == [0, 0, 1, 1]
    assert d["templates"] == DEFAULT_TEMPLATES and all("{c}" in t for t in d["templates"])
    assert len(d["images"]) == 4 and d["images"][3].size == (8, 8)
    d = load_imagefolder(root, classnames=["dog", "cat"], templates=["a {c}."])
    assert d["classnames"] == ["dog", "cat"] and d["templates"] == ["a {c}."]
    with pytest.raises(ValueError):
        load_imagefolder(root, classnames=["dog"])


def test_load_karpathy_json(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:2]):
        Image.new("RGB", (8, 8), colour).save(root / "val2014" / f"im{i}.jpg")
    items = [{"image": "val2014/im0.jpg", "caption": ["a red thing", "something red"]},
             {"image": "val2014/im1.jpg", "caption": ["a blue thing", "something blue"]}]
    (root / "coco_test.json").write_text(json.dumps(items))
    d = load_karpathy_json(root / "coco_test.json", root)
    assert d["captions"] == ["a red thing", "something red", "a blue thing", "something blue"]
    assert d["text_to_image"].tolist() == [0, 0, 1, 1]
    assert len(d["images"]) == 2 and d["images"][1].getpixel((4, 4))[2] > 200
    # and through the registry, with the DiHT caption template
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "coco").symlink_to(root, target_is_directory=True)
    spec, data = resolve("coco_t2i", tmp_path / "data")
    assert spec.wrap_captions(data["captions"])[0] == "a photo of a red thing."
    (root / "val2014" / "im1.jpg").unlink()  # a missing image: a bad sample, or an error naming it without faults
    with pytest.raises(ValueError, match="im1.jpg': bad_image"):
        load_karpathy_json(root / "coco_test.json", root)
    faults = Faults()
    d = load_karpathy_json(root / "coco_test.json", root, faults=faults)
    assert d["captions"] == ["a red thing", "something red"] and faults.by_reason == {"bad_image": 1}
    (root / "val2014" / "im0.jpg").unlink()  # no image at all: the dataset is absent
    with pytest.raises(DatasetNotFound, match="none of the 2 images"):
        load_karpathy_json(root / "coco_test.json", root, faults=Faults())


def test_load_cc_validation(tmp_path):
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    urls = [f"http://example.com/{i}.jpg" for i in range(3)]
    tsv.write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)))
    shards = tmp_path / "validation"
    shards.mkdir()
    with wds.TarWriter(str(shards / "00000.tar")) as sink:  # img2dataset style; url 1 is dead
        for key, i in (("000000000", 2), ("000000001", 0)):
            sink.write({"__key__": key, "jpg": img_bytes(COLOURS[i], "JPEG"), "txt": f"caption {i}",
                        "json": json.dumps({"url": urls[i], "key": key, "status": "success"}).encode()})
    d = load_cc_validation(tsv, shards, 14_000, 2_000)
    assert d["missing"] == 1 and d["total"] == 3 and d["blocks"][0]["dead"] == 1
    assert d["captions"] == ["caption 0", "caption 2"]  # TSV order kept
    assert d["text_to_image"].tolist() == [0, 1] and d["urls"] == [urls[0], urls[2]]
    assert d["images"][0].getpixel((4, 4))[0] > 200 and d["images"][1].getpixel((4, 4))[1] > 200
    with pytest.raises(DatasetNotFound, match="validation_missing"):
        load_cc_validation(tsv, tmp_path / "validation_missing", 14_000, 2_000)
    with pytest.raises(DatasetNotFound, match="nothere.tsv"):
        load_cc_validation(tmp_path / "nothere.tsv", shards, 14_000, 2_000)


# --------------------------------------------------------------------------- absent data


@pytest.mark.parametrize("call", [
    lambda p: load_wds_classification(p / "wds" / "imagenet1k", "test"),
    lambda p: load_wds_retrieval(p / "wds" / "imagenet1k", "test"),
    lambda p: load_imagefolder(p / "wds" / "imagenet1k"),
    lambda p: load_karpathy_json(p / "wds" / "imagenet1k" / "x.json", p),
])
def test_absent_data_raises_with_path(tmp_path, call):
    with pytest.raises(DatasetNotFound) as err:
        call(tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "wds" / "imagenet1k") in str(err.value)


def test_missing_shard_and_split(tmp_path):
    root = tmp_path / "ds"
    make_wds_classification(root)
    with pytest.raises(DatasetNotFound, match="'train' split"):
        load_wds_classification(root, "train")
    (root / "test" / "1.tar").unlink()
    with pytest.raises(DatasetNotFound, match="1.tar"):
        load_wds_classification(root, "test")


def test_resolve_and_check_available(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        resolve("imagenet1k", tmp_path)
    assert str(tmp_path / "wds" / "imagenet1k") in str(err.value) and "imagenet1k" in str(err.value)

    make_wds_classification(tmp_path / "wds" / "mnist")
    make_wds_retrieval(tmp_path / "eval" / "synthetic_retrieval")
    (tmp_path / "wds" / "dtd" / "test").mkdir(parents=True)
    (tmp_path / "wds" / "dtd" / "test" / "0.tar").write_bytes(b"not a tar at all" * 64)
    (tmp_path / "wds" / "dtd" / "classnames.txt").write_text("banded\n")
    (tmp_path / "wds" / "dtd" / "zeroshot_classification_templates.txt").write_text("a {c} texture.\n")
    report = check_available(["mnist", "synthetic_retrieval", "imagenet1k", "cc_val_t2i", "dtd"], tmp_path)
    assert report["mnist"] == "ok" and report["synthetic_retrieval"] == "ok"
    assert report["imagenet1k"].startswith("skipped: ") and str(tmp_path / "wds" / "imagenet1k") in report["imagenet1k"]
    assert report["cc_val_t2i"].startswith("skipped: ") and "Validation_GCC" in report["cc_val_t2i"]
    assert report["dtd"].startswith("skipped: ") and "0.tar" in report["dtd"]
    spec, data = resolve("mnist", tmp_path)
    assert spec.kind == "classification" and data["labels"].tolist() == [0, 1, 0]
    full = check_available(None, tmp_path)
    assert set(full) == set(list_tasks()) and sum(v == "ok" for v in full.values()) == 2
    assert all(v == "ok" or v.startswith("skipped: ") for v in full.values())
    with pytest.raises(ValueError):
        check_available(["no_such_task"], tmp_path)

