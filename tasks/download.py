"""Stage `download`: materialise the built-in synthetic source (URL lists come with a later issue)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from diht_core.data.shards import read_samples, shard_paths
from diht_core.data.synthetic import SyntheticConfig, generate

from ._stage import cli, make_task


def body(p, run) -> dict:
    d = p.download
    cfg = SyntheticConfig(
        seed=p.seed, num_train=d.num_train, shard_size=d.shard_size, image_size=d.image_size,
        junk=d.noise.junk, text_in_image=d.noise.text_in_image, mismatched=d.noise.mismatched,
        multi_caption=d.multi_caption, max_captions=d.max_captions, teacher_samples=d.teacher_samples,
        per_class=d.eval.per_class, retrieval_images=d.eval.retrieval_images, vqa_questions=d.eval.vqa_questions,
        fewshot_per_class=d.eval.fewshot_per_class)
    root = Path(p.paths.data)
    for sub in ("raw", "eval"):  # stale shards of a bigger config must not survive
        shutil.rmtree(root / sub, ignore_errors=True)
    counts = generate(cfg, root)
    kinds, multi = Counter(), 0
    for shard in shard_paths(root / "raw" / "train"):
        for s in read_samples(shard):
            kinds[s["json"]["noise"]] += 1
            multi += bool(s["json"]["multi_caption"])
    n = counts["train"]
    return {
        "train_samples": n,
        "train_shards": len(shard_paths(root / "raw" / "train")),
        "teacher_samples": counts["teacher"],
        "noise_fraction": {k: kinds[k] / n for k in ("clean", "junk", "text_in_image", "mismatched")},
        "multi_caption_fraction": multi / n,
        "eval_samples": {k: v for k, v in counts.items() if "/" in k},
    }


download = make_task("download", body)

if __name__ == "__main__":
    cli("download", body)
