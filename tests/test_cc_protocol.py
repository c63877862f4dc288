"""cc_val as the GCC study runs it: the first rows of the validation TSV in blocks of rows, each its own gallery.

A small CC-like dataset (blocks of 5 rows here; the registry's are the study's 2,000 of 14,000) with dead URLs,
rows never downloaded and a short file; per-block recalls checked against CLIP_benchmark's retrieval metric.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import webdataset as wds

from diht_core.data.eval_datasets import load_cc_validation
from diht_core.eval import catalog
from diht_core.eval.registry import diht_tasks, get_task, list_tasks
from diht_core.eval.retrieval import block_retrieval_metrics
from diht_core.eval.runner import run_task
from diht_core.models import create_model
from test_eval_metrics import cb_retrieval
from test_registry import COLOURS, img_bytes

KS = (1, 5)  # CLIP_benchmark's recall_at_k needs k <= gallery size
URL = "http://cc.example/{}.jpg".format


def write_cc(root, n_rows, dead, not_tried=(), duplicates=None, parquet=True):
    """TSV of n_rows rows (row i: caption i, URL i, or the URL of duplicates[i]); shards hold every row's image but
    those of dead and not_tried; the parquet lists every tried row (dead ones as failed)."""
    urls = [URL((duplicates or {}).get(i, i)) for i in range(n_rows)]
    tsv = root / "val.tsv"
    tsv.write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)))
    shards = root / "validation"
    shards.mkdir()
    ok = sorted({u for i, u in enumerate(urls) if i not in dead and i not in not_tried}, key=urls.index)
    rows = []
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for j, u in enumerate(ok[::-1]):  # shard order is not row order: rows are joined by URL
            sink.write({"__key__": f"{j:09d}", "jpg": img_bytes(COLOURS[j % 4], "JPEG"),
                        "json": json.dumps({"url": u, "status": "success"}).encode()})
    for i, u in enumerate(urls):
        if i not in not_tried:
            rows.append({"url": u, "status": "failed" if i in dead else "success"})
    if parquet:
        pd.DataFrame(rows).to_parquet(shards / "00000.parquet")
    return tsv, shards, urls


def embeddings(d, dim=16):
    """Image embedding per URL, caption embedding = its image's + noise (deterministic per caption text)."""
    img = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(u.split("/")[-1][:-4])))
                       for u in d["urls"]])
    noise = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(1000 + int(c.split()[1])))
                         for c in d["captions"]])
    return img, img[d["text_to_image"]] + 1.2 * noise


def test_blocks_of_rows_dead_counted_inside_their_block(tmp_path):
    # 4 blocks of 5 rows over a file of 18 rows: block 3 is short; rows 6 and 7 were never downloaded
    dead = {1, 4, 10, 11, 12, 16}
    tsv, shards, urls = write_cc(tmp_path, 18, dead, not_tried={6, 7}, duplicates={14: 13})
    d = load_cc_validation(tsv, shards, rows=20, block_size=5)
    got = [(b["first_row"], b["rows_in_file"], b["dead"], b["not_downloaded"], b["captions"], b["full"])
           for b in d["blocks"]]
    assert got == [(0, 5, 2, 0, 3, True), (5, 5, 0, 2, 3, False), (10, 5, 3, 0, 2, True), (15, 3, 1, 0, 2, False)]
    assert d["missing"] == 6 and d["total"] == 18
    # rows 13 and 14 share a URL: one image, two captions; images stay in row order, block after block
    assert [b["images"] for b in d["blocks"]] == [(0, 3), (3, 6), (6, 7), (7, 9)]
    assert d["urls"] == [urls[i] for i in (0, 2, 3, 5, 8, 9, 13, 15, 17)]
    assert d["captions"][6:8] == ["caption 13", "caption 14"] and d["text_to_image"][6:8].tolist() == [6, 6]
    # only the first `rows` rows count: block 1 ends the read
    d8 = load_cc_validation(tsv, shards, rows=10, block_size=5)
    assert d8["total"] == 10 and len(d8["blocks"]) == 2 and d8["urls"] == d["urls"][:6]
    # without the parquet nothing tells an untried row from a dead one: both are dead
    (shards / "00000.parquet").unlink()
    d = load_cc_validation(tsv, shards, rows=20, block_size=5)
    assert [(b["dead"], b["not_downloaded"], b["full"]) for b in d["blocks"][:2]] == [(2, 0, True), (2, 0, True)]


def test_per_block_recalls_equal_clip_benchmark_and_only_full_blocks_are_averaged(tmp_path):
    dead = {3, 8, 9, 21, 30, 31, 32}
    tsv, shards, urls = write_cc(tmp_path, 38, dead, not_tried={26})
    d = load_cc_validation(tsv, shards, rows=40, block_size=10)
    img, txt = embeddings(d)
    out = block_retrieval_metrics(img, txt, d["text_to_image"], d["blocks"], ks=KS)
    assert [b["full"] for b in out["blocks"].values()] == [True, True, False, False]  # 26 untried; block 3 short
    assert out["full_blocks"] == 2 and out["partial_blocks"] == 2
    for b in range(4):  # the reference block, rebuilt from the TSV rows: its live rows, one image per row
        live = [i for i in range(10 * b, min(10 * b + 10, 38)) if i not in dead and i != 26]
        ref_img = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in live])
        ref_txt = ref_img + 1.2 * torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(1000 + i))
                                              for i in live])
        ref = cb_retrieval(ref_img, ref_txt, torch.arange(len(live)), KS)
        block = out["blocks"][str(b)]
        assert block["images"] == len(live) and block["dead"] == sum(10 * b <= i < 10 * b + 10 for i in dead)
        for key, v in ref.items():
            assert block[key] == pytest.approx(v, abs=1e-7), (b, key)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5", "mean_recall@1"):
        assert out[key] == pytest.approx((out["blocks"]["0"][key] + out["blocks"]["1"][key]) / 2)


def test_no_full_block_gives_nan_not_a_partial_mean(tmp_path):
    tsv, shards, _ = write_cc(tmp_path, 7, dead={2})
    d = load_cc_validation(tsv, shards, rows=20, block_size=10)
    img, txt = embeddings(d)
    out = block_retrieval_metrics(img, txt, d["text_to_image"], d["blocks"], ks=KS)
    assert out["full_blocks"] == 0 and math.isnan(out["image_retrieval_recall@1"])
    assert out["blocks"]["0"]["rows_in_file"] == 7 and out["blocks"]["1"] == {
        "first_row": 10, "rows_in_file": 0, "captions": 0, "dead": 0, "not_downloaded": 0, "full": False,
        "images": 0}
    assert 0 <= out["blocks"]["0"]["image_retrieval_recall@1"] <= 1


def test_registry_runs_the_study_protocol(tmp_path, monkeypatch):
    assert (catalog.CC_ROWS, catalog.CC_BLOCK_SIZE) == (14_000, 2_000)  # the study's, by default
    assert get_task("cc_val_t2i").block_size == 2000 and get_task("cc_val_t2i").extra
    assert "cc_val_t2i" not in diht_tasks() and list_tasks(extra=True) == ["cc_val_t2i", "cc_val_i2t"]
    cc = tmp_path / "cc"
    cc.mkdir()
    write_cc(cc, 12, dead={5})
    (cc / "val.tsv").rename(cc / "Validation_GCC-1.1.0-Validation.tsv")  # the registry's names
    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    r = run_task("cc_val_i2t", model, preprocess, tok, tmp_path)  # 12 rows of 14,000: one partial block
    assert math.isnan(r["main"]) and r["full_blocks"] == 0 and r["partial_blocks"] == 7
    assert r["blocks"]["0"]["images"] == 11 and r["blocks"]["0"]["dead"] == 1 and r["missing"] == 1
    monkeypatch.setattr(catalog, "CC_BLOCK_SIZE", 4)
    monkeypatch.setattr(catalog, "CC_ROWS", 12)
    r = run_task("cc_val_i2t", model, preprocess, tok, tmp_path)
    assert r["full_blocks"] == 3 and r["main"] == r["text_retrieval_recall@1"]
    assert r["main"] == pytest.approx(sum(r["blocks"][b]["text_retrieval_recall@1"] for b in "012") / 3)
    assert r["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 4) / 3)
