"""Real registry tasks run through the benchmark on data in their layouts; absent data is skipped, with the reason."""

import json
import math

import torch
import webdataset as wds

from diht_core.eval.registry import get_task
from diht_core.eval.report import markdown_table
from diht_core.eval.runner import run_task
from diht_core.models import create_model
from test_registry import COLOURS, img_bytes, make_wds_classification, make_wds_retrieval


def test_registered_tasks_run_or_skip(tmp_path):
    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    make_wds_classification(get_task("cifar10").path(tmp_path))
    make_wds_retrieval(get_task("flickr8k_t2i").path(tmp_path))
    cls = run_task("cifar10", model, preprocess, tok, tmp_path)
    assert {"acc1", "mean_per_class_recall", "main", "chance"} <= set(cls) and cls["chance"] == 0.5
    ret = run_task("flickr8k_t2i", model, preprocess, tok, tmp_path)
    assert ret["main"] == ret["image_retrieval_recall@1"] and "text_retrieval_recall@10" in ret
    skipped = run_task("imagenet1k", model, preprocess, tok, tmp_path)
    assert set(skipped) == {"skipped"} and "imagenet1k" in skipped["skipped"]
    table = markdown_table({"cifar10": cls, "imagenet1k": skipped})
    assert "| cifar10 | acc1 |" in table and "imagenet1k | skipped:" in table


def test_cc_validation_reports_the_captions_of_dead_urls(tmp_path):
    """cc_val_*: the Conceptual Captions TSV + img2dataset shards; captions without an image are counted."""
    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    cc = tmp_path / "cc"
    (cc / "validation").mkdir(parents=True)
    urls = [f"http://example.com/{i}.jpg" for i in range(4)]
    (cc / "Validation_GCC-1.1.0-Validation.tsv").write_text("".join(f"a shape {i}\t{u}\n" for i, u in enumerate(urls)))
    with wds.TarWriter(str(cc / "validation" / "00000.tar")) as sink:  # url 3 is dead
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": img_bytes(COLOURS[i], "JPEG"),
                        "json": json.dumps({"url": urls[i], "status": "success"}).encode()})
    r = run_task("cc_val_i2t", model, preprocess, tok, tmp_path)
    assert r["missing"] == 1 and r["total"] == 4 and r["blocks"]["0"]["dead"] == 1
    assert r["blocks"]["0"]["images"] == 3 and 0 <= r["blocks"]["0"]["text_retrieval_recall@1"] <= 1
    # 4 rows of the study's 14,000: block 0 is partial, so there is no mean over full blocks
    assert r["full_blocks"] == 0 and math.isnan(r["main"]) and math.isnan(r["chance"])
