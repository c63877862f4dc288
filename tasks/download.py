"""Stage `download`: the built-in synthetic source, or a URL list fetched img2dataset's way (`download.source`)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from diht_core.data.fetch import FetchConfig
from diht_core.data.shards import read_samples, shard_paths
from diht_core.data.synthetic import SyntheticConfig, generate
from diht_core.data.url_download import DownloadConfig, download_url_list
from diht_core.data.url_lists import read_url_list

from ._stage import cli, make_task


def synthetic_config(p) -> SyntheticConfig:
    d = p.download
    return SyntheticConfig(
        seed=p.seed, num_train=d.num_train, shard_size=d.shard_size, image_size=d.image_size,
        junk=d.noise.junk, text_in_image=d.noise.text_in_image, mismatched=d.noise.mismatched,
        multi_caption=d.multi_caption, max_captions=d.max_captions, teacher_samples=d.teacher_samples,
        per_class=d.eval.per_class, retrieval_images=d.eval.retrieval_images, vqa_questions=d.eval.vqa_questions,
        fewshot_per_class=d.eval.fewshot_per_class)


def url_list_config(u) -> DownloadConfig:
    return DownloadConfig(
        fetch=FetchConfig(timeout=u.timeout, retries=u.retries, backoff=u.backoff, max_bytes=u.max_bytes,
                          max_redirects=u.max_redirects, user_agent=u.user_agent, respect_opt_out=u.respect_opt_out),
        threads=u.threads, shard_size=u.shard_size, resize_mode=u.resize_mode, image_size=u.image_size,
        resize_only_if_bigger=u.resize_only_if_bigger, encode_quality=u.encode_quality, max_pixels=u.max_pixels)


def body(p, run) -> dict:
    return url_list_body(p, run) if p.download.source == "url_list" else synthetic_body(p, run)


def synthetic_body(p, run) -> dict:
    root = Path(p.paths.data)
    for sub in ("raw", "eval"):  # stale shards of a bigger config must not survive
        shutil.rmtree(root / sub, ignore_errors=True)
    counts = generate(synthetic_config(p), root)
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


def url_list_body(p, run) -> dict:
    """data/raw/train from the URL list (finished shards of an earlier run are kept); the teacher split and
    the evaluation tasks are still the synthetic ones, so every later stage runs unchanged."""
    u = p.download.url_list
    if not Path(u.path).is_file():
        raise FileNotFoundError(f"download.url_list.path: no such file {u.path}")
    urls = read_url_list(u.path, u.format, u.url_col, u.caption_col)
    root = Path(p.paths.data)
    stats = download_url_list(urls, root / "raw" / "train", url_list_config(u))
    run.log_artifact(root / "raw" / "train" / "_stats.json")
    for sub in ("raw/teacher", "eval"):
        shutil.rmtree(root / sub, ignore_errors=True)
    counts = generate(synthetic_config(p), root, train=False)
    return {
        "urls": stats["count"],
        "train_samples": stats["successes"],
        "failed": stats["failed"],
        "success_rate": stats["success_rate"],
        "reasons": stats["reasons"],
        "images_per_s": stats["images_per_s"],
        "train_shards": stats["shards"],
        "resumed_shards": stats["resumed_shards"],
        "teacher_samples": counts["teacher"],
        "eval_samples": {k: v for k, v in counts.items() if "/" in k},
    }


download = make_task("download", body)

if __name__ == "__main__":
    cli("download", body)
