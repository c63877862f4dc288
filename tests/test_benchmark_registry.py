"""Real registry tasks run through the benchmark on data in their layouts; absent data is skipped, with the reason."""

import torch

from diht_core.benchmark import markdown_table, run_registered
from diht_core.eval.registry import get_task
from diht_core.models import create_model
from test_registry import make_wds_classification, make_wds_retrieval


def test_registered_tasks_run_or_skip(tmp_path):
    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    make_wds_classification(get_task("cifar10").path(tmp_path))
    make_wds_retrieval(get_task("flickr8k_t2i").path(tmp_path))
    cls = run_registered("cifar10", model, preprocess, tok, tmp_path)
    assert {"acc1", "mean_per_class_recall", "main", "chance"} <= set(cls) and cls["chance"] == 0.5
    ret = run_registered("flickr8k_t2i", model, preprocess, tok, tmp_path)
    assert ret["main"] == ret["image_retrieval_recall@1"] and "text_retrieval_recall@10" in ret
    skipped = run_registered("imagenet1k", model, preprocess, tok, tmp_path)
    assert set(skipped) == {"skipped"} and "imagenet1k" in skipped["skipped"]
    table = markdown_table({"cifar10": cls, "imagenet1k": skipped})
    assert "| cifar10 | acc1 |" in table and "imagenet1k | skipped:" in table
