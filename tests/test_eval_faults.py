"""The real tasks' loaders on bad data: one tiny dataset per layout (CLIP_benchmark wds classification, retrieval and
VQA, Karpathy json, Conceptual Captions, ImageFolder) holding bad JSON, missing and empty captions, labels that are no
integers, an undecodable image, a 144-megapixel PNG header and a tar cut at a header boundary. The benchmark runs, its
metrics equal those of the same datasets holding only their good samples, and every bad sample is counted by reason."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
from PIL import Image

from diht_core.config import BenchmarkParams
from diht_core.data.eval_datasets import load_imagefolder
from diht_core.data.images import load_split
from diht_core.data.shards import Faults, parse_sample, write_shard
from diht_core.eval import catalog
from diht_core.eval.registry import check_available, get_task
from diht_core.eval.runner import run_benchmark
from diht_core.models import create_model
from test_bad_data import _big_png_header as big_png_header
from test_registry import COLOURS, img_bytes

MAX_PIXELS = 89_478_485  # download.url_list.max_pixels
TASKS = ["mnist", "flickr8k_t2i", "vqav2", "coco_i2t", "cc_val_t2i"]


def cut_jpeg() -> bytes:
    """A JPEG whose header reads but whose scan stops short: only decoding finds it bad."""
    buf = io.BytesIO()
    noise = torch.randint(0, 255, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) * 3 // 4]


def colour(i: int) -> bytes:
    return img_bytes(tuple((c + 37 * i) % 256 for c in COLOURS[i % 4]), "PNG")


def write_split(split_dir, shards: list[list[dict]], cut: bool = False) -> None:
    """CLIP_benchmark wds shards {0..n-1}.tar + nshards.txt; cut: the last shard ends at its second sample's
    header (that sample and the rest are lost, nothing says so but the missing end-of-archive)."""
    split_dir.mkdir(parents=True)
    for i, samples in enumerate(shards):
        write_shard(split_dir / f"{i}.tar", samples)
    (split_dir / "nshards.txt").write_text(f"{len(shards)}\n")
    if cut:
        last = split_dir / f"{len(shards) - 1}.tar"
        with tarfile.open(last) as tar:
            first = tar.getmembers()[0].name.split(".")[0]
            offset = next(m.offset for m in tar.getmembers() if m.name.split(".")[0] != first)
        last.write_bytes(last.read_bytes()[:offset])


def wds_task(root, good: list[dict], bad: list[dict], lost: dict, clean: bool) -> None:
    """good[:-1] and the bad ones in 0.tar, good[-1] and a lost sample in a cut 1.tar; clean: the good ones only."""
    if clean:
        write_split(root / "test", [good])
    else:
        write_split(root / "test", [good[:2] + bad + good[2:-1], [good[-1], lost]], cut=True)


def make_classification(root, clean: bool) -> dict:
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("red\nblue\ngreen\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square.\n")
    good = [{"__key__": f"g{i}", "png": colour(i), "cls": str(i % 3)} for i in range(5)]
    bad = [{"__key__": "b0", "png": colour(0), "cls": "0", "json": b"{not json"},
           {"__key__": "b1", "png": colour(1), "cls": "x"},
           {"__key__": "b2", "png": colour(1), "cls": "1.5"},
           {"__key__": "b3", "png": colour(1), "cls": "3"},  # outside the 3 classes
           {"__key__": "b4", "png": colour(2)},
           {"__key__": "b5", "jpg": cut_jpeg(), "cls": "0"},
           {"__key__": "b6", "png": big_png_header(), "cls": "1"},
           {"__key__": "b7", "cls": "2"}]
    wds_task(root, good, bad, {"__key__": "lost", "png": colour(9), "cls": "0"}, clean)
    return {"bad_json": 1, "bad_label": 4, "bad_image": 2, "too_many_pixels": 1}


def make_retrieval(root, clean: bool) -> dict:
    good = [{"__key__": f"g{i}", "png": colour(i), "txt": f"shade {i}\nthe colour {i}"} for i in range(5)]
    bad = [{"__key__": "b0", "png": colour(0), "txt": "shade 0", "json": b"[1, 2]"},
           {"__key__": "b1", "png": colour(1)},
           {"__key__": "b2", "png": colour(2), "txt": " \n  "},
           {"__key__": "b3", "jpg": cut_jpeg(), "txt": "a cut one"},
           {"__key__": "b4", "png": big_png_header(), "txt": "a huge one"}]
    wds_task(root, good, bad, {"__key__": "lost", "png": colour(9), "txt": "lost"}, clean)
    return {"bad_json": 1, "missing_caption": 1, "empty_caption": 1, "bad_image": 1, "too_many_pixels": 1}


def make_vqa(root, clean: bool) -> dict:
    def q(i, **over):
        return json.dumps({"question": f"which shade {i}?", "answers": ["red", "blue", "green"], "label": i % 3,
                           **over}).encode()
    good = [{"__key__": f"g{i}", "png": colour(i), "json": q(i)} for i in range(5)]
    bad = [{"__key__": "b0", "png": colour(0), "json": b'{"question": "\xff"}'},
           {"__key__": "b1", "png": colour(1), "json": q(1, answers="red")},
           {"__key__": "b2", "png": colour(2), "json": q(2, label=3)},
           {"__key__": "b3", "png": colour(2), "json": q(2, label="x")},
           {"__key__": "b4", "png": colour(3)},
           {"__key__": "b5", "jpg": cut_jpeg(), "json": q(0)},
           {"__key__": "b6", "png": big_png_header(), "json": q(1)}]
    wds_task(root, good, bad, {"__key__": "lost", "png": colour(9), "json": q(0)}, clean)
    return {"bad_json": 3, "bad_label": 2, "bad_image": 1, "too_many_pixels": 1}


def make_karpathy(root, clean: bool) -> dict:
    (root / "val2014").mkdir(parents=True)
    good = []
    for i in range(4):
        (root / "val2014" / f"g{i}.png").write_bytes(colour(i))
        good.append({"image": f"val2014/g{i}.png", "caption": [f"shade {i}", f"the colour {i}"]})
    (root / "val2014" / "cut.jpg").write_bytes(cut_jpeg())
    (root / "val2014" / "huge.png").write_bytes(big_png_header())
    bad = ["val2014/g0.png",  # not an object
           {"image": "val2014/g1.png"},
           {"image": "val2014/g2.png", "caption": ["  "]},
           {"image": "val2014/cut.jpg", "caption": "a cut one"},
           {"image": "val2014/huge.png", "caption": "a huge one"},
           {"image": "val2014/absent.png", "caption": "no file"}]
    items = good if clean else good[:2] + bad + good[2:]
    (root / "coco_test.json").write_text(json.dumps(items))
    return {"bad_json": 1, "missing_caption": 1, "empty_caption": 1, "bad_image": 2, "too_many_pixels": 1}


CC_URL = "http://cc.example/{}.jpg".format


def make_cc(root, clean: bool) -> tuple[dict, dict]:
    """10 rows in 2 blocks of 5; rows 7 and 8 share a URL. Row 2's image is cut, rows 7/8's is 144 megapixels, row 4's
    json is not JSON, row 9's sample is lost in a cut shard: all dead rows of their blocks."""
    urls = [CC_URL(8 if i == 7 else i) for i in range(10)]
    (root / "validation").mkdir(parents=True)
    (root / "Validation_GCC-1.1.0-Validation.tsv").write_text("".join(f"shade {i}\t{u}\n" for i, u in enumerate(urls)))

    def sample(i, image, meta=None):
        return {"__key__": f"{i:09d}", **image,
                "json": meta or json.dumps({"url": CC_URL(i), "status": "success"}).encode()}
    good = [sample(i, {"png": colour(i)}) for i in (0, 1, 3, 5, 6)]
    bad = [sample(2, {"jpg": cut_jpeg()}), sample(8, {"png": big_png_header()}),
           sample(4, {"png": colour(4)}, b"{not json"), sample(11, {"png": colour(1)}, b'{"status": "success"}')]
    failed = sample(12, {}, json.dumps({"url": CC_URL(12), "status": "failed_to_download"}).encode())  # no sample
    if clean:
        write_shard(root / "validation" / "00000.tar", good)
    else:
        write_shard(root / "validation" / "00000.tar", good[:2] + bad + [failed] + good[2:])
        write_split(root / "validation" / "cut", [[sample(10, {"png": colour(0)}), sample(9, {"png": colour(9)})]],
                    cut=True)  # row 10 is past the rows read; row 9's sample is lost
        (root / "validation" / "cut" / "0.tar").rename(root / "validation" / "00001.tar")
    return ({"bad_json": 2, "bad_image": 1, "too_many_pixels": 1},
            {"0": {"bad_image": 1}, "1": {"too_many_pixels": 2}})


def make_all(data_root, clean: bool) -> dict:
    """Every layout under data_root; task -> the faults its bad samples count as."""
    counts = {"mnist": make_classification(get_task("mnist").path(data_root), clean),
              "flickr8k_t2i": make_retrieval(get_task("flickr8k_t2i").path(data_root), clean),
              "vqav2": make_vqa(get_task("vqav2").path(data_root), clean),
              "coco_i2t": make_karpathy(data_root / "coco", clean)}
    counts["cc_val_t2i"], _ = make_cc(data_root / "cc", clean)
    return counts


def without_faults(r: dict) -> dict:
    out = {k: v for k, v in r.items() if not k.startswith(("skipped", "truncated"))}
    if "blocks" in out:
        out["blocks"] = {b: {k: v for k, v in e.items() if k != "dead_by_reason"} for b, e in out["blocks"].items()}
    return out


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (CC's chance without a full block)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_benchmark_counts_bad_samples_of_every_layout_and_scores_the_good_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "CC_ROWS", 10)
    monkeypatch.setattr(catalog, "CC_BLOCK_SIZE", 5)
    dirty, clean = tmp_path / "dirty", tmp_path / "clean"
    expected = make_all(dirty, clean=False)
    make_all(clean, clean=True)
    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    run = {root: run_benchmark(BenchmarkParams(tasks=TASKS, data_root=str(root)), root, model, preprocess, tok,
                               MAX_PIXELS) for root in (dirty, clean)}
    for task in TASKS:
        r, ok = run[dirty][task], run[clean][task]
        assert "skipped" not in r and "main" in r, (task, r)
        assert r["skipped_by_reason"] == expected[task], task
        assert r["skipped_samples"] == sum(expected[task].values())
        assert not any(k.startswith(("skipped", "truncated")) for k in ok)  # clean data: as it always was
        assert same(without_faults(r), ok), (task, without_faults(r), ok)
        truncated = {"mnist": "1.tar", "flickr8k_t2i": "1.tar", "vqav2": "1.tar", "cc_val_t2i": "00001.tar"}
        if task in truncated:
            assert r["truncated_shards"][truncated[task]]["read"] == 1, task
        else:
            assert r["truncated_shards"] == {}
    cc = run[dirty]["cc_val_t2i"]
    assert {b: e.get("dead_by_reason") for b, e in cc["blocks"].items()} == make_cc(tmp_path / "x", False)[1]
    assert cc["full_blocks"] == 2 and cc["missing"] == 5 and cc["blocks"]["1"]["dead"] == 3  # rows 7, 8 and 9
    report = check_available(TASKS, dirty)
    assert all(report[t].startswith("ok, skipped by reason") for t in TASKS), report


def test_imagefolder_skips_and_counts_bad_files(tmp_path):
    for root, clean in ((tmp_path / "dirty", False), (tmp_path / "clean", True)):
        for c in range(2):
            (root / f"class_{c}").mkdir(parents=True)
            for i in range(2):
                (root / f"class_{c}" / f"{i}.png").write_bytes(colour(2 * c + i))
        if not clean:
            (root / "class_0" / "cut.jpg").write_bytes(cut_jpeg())
            (root / "class_1" / "huge.png").write_bytes(big_png_header())
            (root / "class_1" / "text.png").write_bytes(b"not an image")
    faults = Faults()
    d = load_imagefolder(tmp_path / "dirty", max_pixels=MAX_PIXELS, faults=faults)
    ok = load_imagefolder(tmp_path / "clean")
    assert faults.by_reason == {"bad_image": 2, "too_many_pixels": 1}
    assert d["labels"].tolist() == ok["labels"].tolist() == [0, 0, 1, 1]
    assert [im.tobytes() for im in d["images"]] == [im.tobytes() for im in ok["images"]]
    with pytest.raises(ValueError, match=r"cut.jpg': bad_image"):  # without faults: an error naming the file
        load_imagefolder(tmp_path / "dirty")


@pytest.mark.parametrize("cls", [b"x", b"1.5", b"", b"\xff", b"1e3"])
def test_parse_sample_never_raises_on_a_bad_label(cls):
    raw = {"__key__": "k", "__url__": "0.tar", "png": colour(0), "cls": cls}
    assert parse_sample(raw)["fault"] is None and "cls" not in parse_sample(raw)  # no label needed: none kept
    s = parse_sample(raw, need_label=True)
    assert s["fault"] == "bad_label" and "not an integer" in s["error"]
    assert parse_sample({**raw, "cls": b" 2\n"}, need_label=True)["cls"] == 2
    assert parse_sample({"__key__": "k", "__url__": "0.tar", "png": colour(0)}, need_label=True)["error"] == "no cls"


def test_load_split_counts_a_bad_label_where_labels_are_needed(tmp_path):
    write_shard(tmp_path / "0.tar", [{"__key__": "a", "png": colour(0), "cls": "1"},
                                     {"__key__": "b", "png": colour(1), "cls": "x"}])
    faults = Faults()
    assert load_split(tmp_path, 8, faults=faults, need_label=True)["cls"].tolist() == [1]
    assert faults.by_reason == {"bad_label": 1}
    assert load_split(tmp_path, 8)["cls"].tolist() == [1, -1]  # no label needed (captions, VQA): none is no fault
