"""Pseudo-captions written into shards (FFF): each image's json "captions" becomes its original captions followed by
K generated ones, shard by shard, resumable. The captioner is passed in (diht_core/models/captioners.py)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .files import atomic_write_text
from .shards import Faults, SampleFault, count_samples, iter_shard, open_image, parse_sample, shard_paths, write_shard

CaptionFn = Callable[[list, int], list[list[str]]]  # (RGB images, seed) -> K captions of each
DONE = "complete.json"  # written last: the folder holds every shard of the input


def input_dir(data: str | Path, source: str) -> Path:
    """The shards train reads without pseudo-captions: the CAT-filtered ones, or the raw ones (train.source)."""
    return Path(data) / ("raw/train" if source == "raw" else "filtered")


def output_dir(data: str | Path, source: str) -> Path:
    """The same shards with pseudo-captions."""
    return Path(data) / "recaptioned" / source


def batch_seed(seed: int, shard: str, batch: int) -> int:
    """The sampling seed of one batch: the same captions whichever shards a resumed run redoes."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()[:7], "big")


def _record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def recaption_shard(in_path: Path, out_path: Path, caption: CaptionFn, run_digest: str, seed: int, batch_size: int,
                    max_pixels: int, progress=None) -> dict:
    """Write ``in_path`` to ``out_path`` with pseudo-captions; return its record (also written beside the tar as
    <name>.recaption.json, after it: a shard is done when both are there with this digest).

    A sample with a fault (see shards.FAULTS) is copied as it is and counted by reason; a truncated input gives a
    complete output of the samples before the cut, and the record names the cut. ``progress``: a tqdm bar of
    samples."""
    record_path = out_path.with_name(f"{out_path.stem}.recaption.json")
    digest = hashlib.sha256(in_path.read_bytes() + run_digest.encode()).hexdigest()[:24]
    done = _record(record_path)
    if done and done.get("digest") == digest and out_path.exists():
        if progress is not None:
            progress.update(done["samples"])
        return {**done, "resumed": True}
    samples, parsed, faults = [], {}, Faults()
    for r in iter_shard(in_path):
        s = parse_sample(r, need_caption=True)
        if faults.skip(s):
            if s["fault"] == "truncated":
                continue
        else:
            parsed[len(samples)] = s
        samples.append({k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"})  # as it is
    if progress is not None:
        progress.update(faults.skipped)
    generated: dict[int, list[str]] = {}
    batch: list[tuple[int, object]] = []
    blank, n_batch = 0, 0
    for n, (i, s) in enumerate(parsed.items()):
        try:
            batch.append((i, open_image(s.get("image_bytes"), max_pixels)))
        except SampleFault as fault:
            faults.count(fault.reason)
            if progress is not None:
                progress.update(1)
        if batch and (len(batch) == batch_size or n == len(parsed) - 1):
            out = caption([img for _, img in batch], batch_seed(seed, in_path.name, n_batch))
            for (j, _), caps in zip(batch, out, strict=True):
                generated[j] = [c for c in caps if c.strip()]
                blank += len(caps) - len(generated[j])
            if progress is not None:
                progress.update(len(batch))
            n_batch += 1
            batch = []
    for i, caps in generated.items():
        meta = dict(parsed[i].get("json") or {})
        meta["captions"] = parsed[i]["captions"] + caps  # the originals first: CAT and txt readers see them
        meta["recaption"] = {"original": len(parsed[i]["captions"]), "generated": len(caps)}
        samples[i]["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    write_shard(out_path, samples)
    record = {"digest": digest, "samples": len(samples), "images": len(generated),
              "captions_written": sum(map(len, generated.values())), "blank_captions": blank,
              "skipped_by_reason": faults.by_reason, "truncated": faults.truncated.get(in_path.name)}
    atomic_write_text(record_path, json.dumps(record, sort_keys=True) + "\n")
    return {**record, "resumed": False}


def recaption_shards(in_dir: Path, out_dir: Path, make_caption: Callable[[], CaptionFn], run_digest: str, seed: int,
                     batch_size: int, max_pixels: int) -> dict:
    """Every shard of ``in_dir`` into ``out_dir`` (``recaption_shard``); outputs of shards no longer in the input
    are removed; the captioner is built (``make_caption``) only when a shard needs it. Returns the metrics."""
    shards = shard_paths(in_dir)
    if not shards:
        raise FileNotFoundError(f"no shards in {in_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE).unlink(missing_ok=True)  # until every shard is done again
    names = {s.stem for s in shards}
    for f in list(out_dir.glob("*.tar")) + list(out_dir.glob("*.recaption.json")):
        if f.name.split(".")[0] not in names:
            f.unlink()
    fn: list[CaptionFn] = []

    def caption(images, s):
        if not fn:
            fn.append(make_caption())
        return fn[0](images, s)

    start, records = time.perf_counter(), {}
    with tqdm(total=count_samples(in_dir), desc="recaption: samples", unit="sample") as bar:
        for shard in shards:
            records[shard.name] = recaption_shard(shard, out_dir / shard.name, caption, run_digest, seed,
                                                  batch_size, max_pixels, bar)
    seconds = time.perf_counter() - start
    faults = Faults()
    for name, r in records.items():
        faults.merge(r["skipped_by_reason"], {name: r["truncated"]} if r["truncated"] else {})
    fresh = [r for r in records.values() if not r["resumed"]]
    metrics = {"enabled": True, "shards": len(records), "shards_resumed": len(records) - len(fresh),
               "samples": sum(r["samples"] for r in records.values()),
               "images": sum(r["images"] for r in records.values()),
               "captions_written": sum(r["captions_written"] for r in records.values()),
               "blank_captions": sum(r["blank_captions"] for r in records.values()),
               "skipped": faults.skipped, "skipped_by_reason": faults.by_reason,
               "truncated_shards": faults.truncated,
               "images_per_s": sum(r["images"] for r in fresh) / seconds if fresh and seconds > 0 else None}
    atomic_write_text(out_dir / DONE, json.dumps({"run_digest": run_digest, "shards": sorted(records)}) + "\n")
    return metrics
