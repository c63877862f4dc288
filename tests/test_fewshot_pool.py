"""The few-shot train pool streams from shards: labels first, only the k-shot samples decoded, a batch at a time."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from diht_core.config import FewshotParams
from diht_core.data.images import load_split
from diht_core.data.shards import Faults, iter_shard, write_shard
from diht_core.eval import fewshot_pool
from diht_core.eval.encoders import encode_images, text_encoder
from diht_core.eval.fewshot import fewshot_curve, run_fewshot
from diht_core.eval.fewshot_pool import PoolFeatures, kshot_indices, needed_indices, split_labels, stream_features
from diht_core.eval.zeroshot import build_classifier
from diht_core.models import create_model, image_size
from test_bad_data import _big_png_header as big_png_header

CLASSES = ["red", "green", "blue"]
MAX_PIXELS = 89_478_485  # download.url_list.max_pixels


def read_samples_raw(shard) -> list[dict]:
    """The samples of a shard as written (key and members)."""
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(shard)]


def png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_task(root, per_class: dict[str, int], shard_size: int = 7, seed: int = 0):
    """A synthetic classification task (3 colour classes, noisy shades) in the wds layout, several shards a split."""
    g = torch.Generator().manual_seed(seed)
    for split, per in per_class.items():
        labels = torch.arange(len(CLASSES)).repeat(per)[torch.randperm(per * len(CLASSES), generator=g)]
        samples = []
        for i, c in enumerate(labels.tolist()):
            rgb = [int(v) for v in torch.randint(0, 90, (3,), generator=g)]
            rgb[c] += 150
            samples.append({"__key__": f"{i:06d}", "png": png(tuple(rgb)), "cls": str(c)})
        (root / split).mkdir(parents=True)
        for s in range(0, len(samples), shard_size):
            write_shard(root / split / f"{s // shard_size:05d}.tar", samples[s:s + shard_size])
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square.\n")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, tok = create_model("diht-tiny-vit")
    return model.eval(), tok


def test_only_the_kshot_samples_are_decoded_a_batch_at_a_time(tmp_path, monkeypatch):
    write_task(tmp_path, {"train": 20})  # a pool of 60 in 9 shards
    labels, positions = split_labels(tmp_path / "train")
    assert torch.equal(positions, torch.arange(len(labels)))  # no bad sample: the pool is the split
    keep = needed_indices(labels, [0, 1, 2], seeds=2)
    assert 3 <= len(keep) <= 12 < len(labels)
    decoded, held = [], []
    real_open = fewshot_pool.open_image
    monkeypatch.setattr(fewshot_pool, "open_image", lambda data, limit: decoded.append(1) or real_open(data, limit))
    x = stream_features(tmp_path / "train", keep, lambda imgs: held.append(len(imgs)) or imgs.float().mean((2, 3)),
                        16, None, batch_size=4)
    assert len(decoded) == len(keep)  # the rest of the pool is never decoded
    assert max(held) <= 4 and sum(held) == len(keep)  # never more than one batch of images at once
    ref = load_split(tmp_path / "train", 16)
    assert torch.equal(x, ref["images"][keep].float().mean((2, 3)))  # the right samples, in pool order
    assert torch.equal(labels, ref["cls"])
    pool = PoolFeatures(keep, x)
    for k, seed in ((1, 0), (2, 1)):
        idx = kshot_indices(labels, k, seed)
        assert torch.equal(pool[idx], ref["images"][idx].float().mean((2, 3)))
    missing = next(i for i in range(len(labels)) if i not in set(keep.tolist()))
    with pytest.raises(IndexError):
        pool[torch.tensor([missing])]


def test_whole_split_streamed_equals_the_split_in_memory(tmp_path, tiny):
    model, _ = tiny
    write_task(tmp_path, {"test": 5})
    size = image_size(model)
    old = encode_images(model, load_split(tmp_path / "test", size)["images"], batch_size=4)
    new = stream_features(tmp_path / "test", None, lambda imgs: encode_images(model, imgs, 4), size, None, 4)
    assert torch.equal(new, old)  # same batches, same bits


def test_curve_equals_the_in_memory_curve(tmp_path, tiny):
    """The numbers before streaming: every split decoded whole, embedded, then the k-shot rows picked (here a part
    of the pool, embedded in other batches than before)."""
    model, tok = tiny
    write_task(tmp_path, {"train": 4, "val": 3, "test": 4})
    f = FewshotParams(shots=[0, 1, 2], seeds=3, deltas=[0.0, 0.5], delta_bs=[0.0, 0.5], weight_decays=[0.0, 1e-3],
                      steps=15)
    size = image_size(model)
    split = {s: load_split(tmp_path / s, size) for s in ("train", "val", "test")}
    x = {s: encode_images(model, d["images"], 256) for s, d in split.items()}
    W0 = build_classifier(text_encoder(model, tok, 256), CLASSES, ["a {c} square."])
    old = run_fewshot(x["train"], split["train"]["cls"], x["val"], split["val"]["cls"], x["test"],
                      split["test"]["cls"], W0, f)
    assert fewshot_curve(model, tok, tmp_path, f) == old


def test_shots_up_to_25():
    assert FewshotParams(shots=[0, 1, 5, 10, 25]).shots == [0, 1, 5, 10, 25]
    with pytest.raises(ValidationError, match="25"):
        FewshotParams(shots=[1, 26])
    with pytest.raises(ValidationError, match="0"):
        FewshotParams(shots=[-1])


def _bad_samples() -> list[dict]:
    """One sample of each fault the label pass must catch, none of which may ever be picked."""
    jpg = io.BytesIO()
    Image.fromarray(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()).save(jpg, format="JPEG")
    return [{"__key__": "bad_json", "png": png((200, 0, 0)), "cls": "0", "json": b"{not json"},
            {"__key__": "word_cls", "png": png((200, 0, 0)), "cls": "x"},
            {"__key__": "float_cls", "png": png((0, 200, 0)), "cls": "1.5"},
            {"__key__": "no_cls", "png": png((0, 0, 200))},
            {"__key__": "cut_jpeg", "jpg": jpg.getvalue()[:len(jpg.getvalue()) * 3 // 4], "cls": "0"},
            {"__key__": "big_png", "png": big_png_header(), "cls": "1"},
            {"__key__": "no_image", "cls": "2"}]


def test_a_bad_sample_is_an_error_naming_shard_key_and_reason(tmp_path):
    (tmp_path / "train").mkdir()
    write_shard(tmp_path / "train" / "00000.tar", [{"__key__": "a", "png": png((200, 0, 0)), "cls": "0"},
                                                   {"__key__": "b", "png": b"not an image", "cls": "1"}])
    with pytest.raises(ValueError, match=r"00000.tar sample 'b': bad_image"):
        split_labels(tmp_path / "train")
    with pytest.raises(ValueError, match=r"00000.tar sample 'b': bad_image"):
        stream_features(tmp_path / "train", None, lambda imgs: imgs.float(), 8, None, 4)
    stream_features(tmp_path / "train", torch.tensor([0]), lambda imgs: imgs.float(), 8, None, 4)  # b not kept
    write_shard(tmp_path / "train" / "00000.tar", [{"__key__": "c", "png": png((0, 0, 200)), "cls": "x"}])
    with pytest.raises(ValueError, match=r"00000.tar sample 'c': bad_label"):
        split_labels(tmp_path / "train")


def test_bad_samples_are_counted_never_picked_and_the_curve_is_the_clean_one(tmp_path, tiny):
    """Every split holds bad samples (bad json, a cls that is no integer or missing, a cut JPEG, a 144-megapixel PNG
    header, no image) and train a shard cut at a header boundary: the label pass counts them, never puts them in the
    pool, and the curve equals that of the same task holding only its good samples."""
    model, tok = tiny
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    write_task(clean, {"train": 4, "val": 2, "test": 3})
    for split in ("train", "val", "test"):
        good = [s for shard in sorted((clean / split).glob("*.tar")) for s in read_samples_raw(shard)]
        (dirty / split).mkdir(parents=True)
        write_shard(dirty / split / "00000.tar", good[:3] + _bad_samples() + good[3:-1])
        write_shard(dirty / split / "00001.tar", good[-1:] + [{"__key__": "lost", "png": png((1, 2, 3)), "cls": "0"}])
        with tarfile.open(dirty / split / "00001.tar") as tar:
            cut = tar.getmembers()[2].offset  # the header of the second sample: it is lost
        (dirty / split / "00001.tar").write_bytes((dirty / split / "00001.tar").read_bytes()[:cut])
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (dirty / f).write_bytes((clean / f).read_bytes())
    faults = Faults()
    labels, positions = split_labels(dirty / "train", MAX_PIXELS, faults)
    assert torch.equal(labels, split_labels(clean / "train")[0])
    assert positions.tolist() == [0, 1, 2, *range(10, len(labels) + 7)]  # the 7 bad ones (3..9) are not in the pool
    reasons = {"bad_json": 1, "bad_label": 3, "bad_image": 2, "too_many_pixels": 1}
    assert faults.by_reason == reasons and faults.truncated["00001.tar"]["read"] == 1
    f = FewshotParams(shots=[0, 1, 2], seeds=2, deltas=[0.0, 0.5], delta_bs=[0.0], weight_decays=[0.0], steps=5)
    res = fewshot_curve(model, tok, dirty, f, batch_size=4, max_pixels=MAX_PIXELS)
    skipped = res.pop("skipped")
    assert set(skipped) == {"train", "val", "test"}
    assert all(s["skipped_by_reason"] == reasons and s["skipped_samples"] == 7 for s in skipped.values())
    assert all(s["truncated_shards"]["00001.tar"]["read"] == 1 for s in skipped.values())
    assert res == fewshot_curve(model, tok, clean, f, batch_size=4, max_pixels=MAX_PIXELS)
