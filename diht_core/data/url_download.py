"""Download a URL list into webdataset shards, img2dataset's output layout, resumable."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import DownloadParams, UrlListParams
from .fetch import FetchError, fetch
from .files import atomic_path, atomic_write_text
from .resize import ImageError, load_image, resize
from .shards import encode_jpg, write_shard
from .preclean import list_columns, preclean
from .synthetic import SourceConflict, clear_synthetic, eval_counts, generate, synthetic_train_in
from .url_lists import read_url_list

COLUMNS = ["key", "url", "caption", "status", "reason", "error_message", "bytes",
           "original_width", "original_height", "width", "height", "sha256"]


IMAGE_SETTINGS = ("resize_mode", "image_size", "resize_only_if_bigger", "encode_quality", "max_pixels", "max_bytes")


def image_digest(cfg: UrlListParams) -> str:
    """The settings that decide the stored bytes (not timeouts or threads)."""
    return json.dumps({k: getattr(cfg, k) for k in IMAGE_SETTINGS}, sort_keys=True)


def _row(key: str, url: str, caption: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(key=key, url=url, caption=caption, bytes=0)
    return row


def dropped_row(key: str, url: str, caption: str, reason: str, message: str) -> dict:
    """The parquet row of a URL that pre-cleaning dropped: never requested."""
    row = _row(key, url, caption)
    row.update(status="failed", reason=reason, error_message=message[:500])
    return row


def download_one(key: str, url: str, caption: str, cfg: UrlListParams) -> tuple[dict | None, dict]:
    """(webdataset sample or None, parquet row) of one URL."""
    row = _row(key, url, caption)
    try:
        data = fetch(url, cfg)
        row["bytes"] = len(data)
        img = load_image(data, cfg.max_pixels)
        row.update(original_width=img.width, original_height=img.height)
        img = resize(img, cfg.resize_mode, cfg.image_size, cfg.resize_only_if_bigger)
        jpg = encode_jpg(img, cfg.encode_quality)
    except Exception as err:  # a URL never stops the run: it fails with a reason
        known = isinstance(err, (FetchError, ImageError))
        row.update(status="failed", reason=err.reason if known else "error",
                   error_message=(err.message if known else f"{type(err).__name__}: {err}")[:500])
        return None, row
    row.update(status="success", reason="ok", width=img.width, height=img.height,
               sha256=hashlib.sha256(jpg).hexdigest())
    meta = {k: row[k] for k in ("url", "caption", "key", "status", "error_message", "width", "height",
                                "original_width", "original_height", "sha256")}
    return {"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta).encode()}, row


def shard_digest(rows: pd.DataFrame, first_index: int, cfg: UrlListParams, image_filter=None) -> str:
    """The digest of a shard's input: its rows (with their pre-cleaning decisions, where made), the image settings
    and the image classifiers (where used)."""
    h = hashlib.sha256(image_digest(cfg).encode())
    h.update(str(first_index).encode())
    for url, caption in zip(rows.url, rows.caption):
        h.update(url.encode() + b"\t" + caption.encode() + b"\n")
    if "drop_reason" in rows.columns:
        h.update(b"preclean\n" + "\n".join(rows.drop_reason).encode())
    if image_filter is not None:
        h.update(b"image_filter\n" + image_filter.digest.encode())
    return h.hexdigest()[:24]


def shard_done(out_dir: Path, name: str, digest: str) -> bool:
    pq_path = out_dir / f"{name}.parquet"
    if not (pq_path.exists() and (out_dir / f"{name}.tar").exists()):
        return False
    try:
        meta = pq.read_schema(pq_path).metadata or {}
    except Exception:  # a damaged file
        return False
    return meta.get(b"input_digest", b"").decode() == digest


def write_shard_pair(out_dir: Path, name: str, samples: list[dict], rows: list[dict], digest: str,
                     seconds: float) -> None:
    """The tar, then the parquet that marks the shard finished; each written to a tmp file and renamed."""
    write_shard(out_dir / f"{name}.tar", samples)
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=COLUMNS), preserve_index=False)
    meta = {b"input_digest": digest.encode(), b"seconds": str(seconds).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with atomic_path(out_dir / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)


def _clean(out_dir: Path, names: set[str]) -> None:
    """Drop tmp files of a killed run (the data folder's lock is held: no other writer's) and the shards of another
    list."""
    for f in out_dir.iterdir():
        if f.name.endswith(".tmp") or (f.suffix in (".tar", ".parquet") and f.stem not in names):
            f.unlink()


def download_url_list(urls: pd.DataFrame, out_dir: str | Path, cfg: UrlListParams = UrlListParams(),
                      progress: bool = True, image_filter=None, map_parts=None) -> dict:
    """Download every row of urls (columns url, caption) into shards under out_dir; return the stats.

    cfg: the `download.url_list` params (fetching, threads, shard size, resizing and encoding). A row whose
    `drop_reason` column (preclean) is not empty is not requested: its parquet row fails with that reason and its
    `drop_message`. image_filter (image_filter.ImageFilter): classifiers run on each shard's images before it is
    written; the images they flag fail with their reason.

    `<out>/<shard:05d>.tar` holds the successes (`jpg`, `txt`, `json` per sample), `<out>/<shard:05d>.parquet`
    one row per URL of the shard (successes and failures, with the reason), `<out>/_stats.json` the counts
    of the whole list. Keys are the row index in the list (`%09d`), so a rerun gives every URL its key again.

    A shard is finished when its parquet exists and carries the digest of its input rows and of the
    settings that shape the images; the tar is renamed into place before the parquet, both atomically.
    A rerun (after kill -9, say) skips finished shards and redoes the others from scratch.

    cfg.task_runner: thread fetches every shard on one thread pool here; process and dask split the unfinished
    shards into parts (split_parts) and run each part (download_part) on a worker process with its own pool of
    cfg.threads. dask needs map_parts(fn, parts) -> results: the caller's engine (tasks/download.py maps the
    parts with Prefect's DaskTaskRunner; diht_core imports no Prefect). Shard names, keys, and the shards'
    bytes are the same whichever runner and worker wrote them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(urls)
    shards = [(f"{i:05d}", start, urls.iloc[start:start + cfg.shard_size])
              for i, start in enumerate(range(0, n, cfg.shard_size))]
    _clean(out_dir, {name for name, _, _ in shards})
    todo = [(name, start, rows, shard_digest(rows, start, cfg, image_filter)) for name, start, rows in shards]
    todo = [t for t in todo if not shard_done(out_dir, t[0], t[3])]
    t0 = time.monotonic()
    total = sum(len(t[2]) for t in todo)
    if cfg.task_runner == "thread":
        fetched = _run(todo, out_dir, cfg, progress, total=total, image_filter=image_filter)
    else:
        parts = [(out_dir, part, cfg, image_filter) for part in split_parts(todo, cfg.processes)]
        fetched = _run_parts(parts, cfg, progress, total, map_parts)
        _clean(out_dir, {name for name, _, _ in shards})  # the tmp files of a worker lost mid-shard
    seconds = time.monotonic() - t0
    stats = shard_stats(out_dir, [name for name, _, _ in shards])
    stats.update(shards=len(shards), resumed_shards=len(shards) - len(todo), seconds=round(seconds, 3),
                 fetched_this_run=fetched["urls"], images_per_s=round(fetched["ok"] / seconds, 2) if seconds else 0.0,
                 config=cfg.model_dump())
    atomic_write_text(out_dir / "_stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _run(todo: list, out_dir: Path, cfg: UrlListParams, progress: bool, total: int, image_filter=None) -> dict:
    """Fetch the shards' URLs on one thread pool (a shard's slow tail overlaps the next shard) and write
    each shard as soon as its last URL is in."""
    jobs = ((si, j, f"{start + j:09d}", url, cap, drop)
            for si, (_, start, rows, _) in enumerate(todo)
            for j, (url, cap, drop) in enumerate(zip(rows.url, rows.caption, _drops(rows))))
    results = [[None] * len(t[2]) for t in todo]
    left = [len(t[2]) for t in todo]
    started = [0.0] * len(todo)
    done = {"urls": 0, "ok": 0}
    bar = tqdm(total=total, unit="url", desc="download", disable=not progress, mininterval=1.0, smoothing=0.1)
    t0 = time.monotonic()

    def record(si: int, j: int, sample: dict | None, row: dict) -> None:
        results[si][j] = (sample, row)
        left[si] -= 1
        done["urls"] += 1
        done["ok"] += sample is not None
        bar.update(1)
        if left[si] == 0:
            name, _, _, digest = todo[si]
            pairs = results[si] if image_filter is None else image_filter.apply(results[si])
            write_shard_pair(out_dir, name, [s for s, _ in pairs if s is not None], [r for _, r in pairs], digest,
                             time.monotonic() - started[si])
            results[si] = None

    with ThreadPoolExecutor(cfg.threads) as ex:
        inflight = set()

        def submit() -> None:
            for si, j, key, url, cap, drop in jobs:
                started[si] = started[si] or time.monotonic()
                if drop is not None:  # pre-cleaned: never requested
                    record(si, j, None, dropped_row(key, url, cap, *drop))
                    continue
                inflight.add(ex.submit(_job, si, j, key, url, cap, cfg))
                if len(inflight) >= 4 * cfg.threads:
                    return

        submit()
        while inflight:
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            inflight.difference_update(finished)
            for f in finished:
                record(*f.result())
            bar.set_postfix(ok=done["ok"], img_s=f"{done['ok'] / max(1e-9, time.monotonic() - t0):.0f}", refresh=False)
            submit()
    bar.close()
    return done


def split_parts(todo: list, workers: int) -> list[list]:
    """The shards to fetch, as runs of consecutive whole shards: `workers` times 1 to 4 parts, each of at least 4
    shards where the list has enough. A part's shards overlap their slow tails (URLs that run into the timeout)
    on its thread pool, so only a part's last shard waits for its tail; several parts per worker let a worker
    that is done early take over, and bound what a lost worker holds up. Which worker writes a shard changes
    nothing in it: names, keys and digests come from the list."""
    n = min(len(todo), workers * min(4, max(1, len(todo) // (4 * workers))))
    bounds = [round(i * len(todo) / n) for i in range(n + 1)] if n else []
    return [todo[a:b] for a, b in zip(bounds, bounds[1:])]


def download_part(part: tuple) -> dict:
    """Fetch one part, (out_dir, shards, cfg, image_filter), on this worker's thread pool; {"urls", "ok"} fetched.
    A shard already finished (by an earlier attempt of this part, on a worker since lost) is not fetched again."""
    out_dir, shards, cfg, image_filter = part
    todo = [t for t in shards if not shard_done(out_dir, t[0], t[3])]
    return _run(todo, out_dir, cfg, progress=False, total=0, image_filter=image_filter)


def _run_parts(parts: list, cfg: UrlListParams, progress: bool, total: int, map_parts) -> dict:
    """download_part over the parts: on a pool of cfg.processes processes, or through map_parts (dask)."""
    if not parts:
        return {"urls": 0, "ok": 0}
    if cfg.task_runner == "dask":
        if map_parts is None:
            raise ValueError("download.url_list.task_runner: dask maps the parts through Prefect's DaskTaskRunner; "
                             "run it from the download stage (tasks/download.py), or pass map_parts")
        results = map_parts(download_part, parts)
    else:
        results = []
        bar = tqdm(total=total, unit="url", desc="download", disable=not progress, mininterval=1.0)
        with ProcessPoolExecutor(min(cfg.processes, len(parts)), mp_context=_forkserver()) as ex:
            futures = {ex.submit(download_part, p): sum(len(t[2]) for t in p[1]) for p in parts}
            try:
                for f in as_completed(futures):
                    results.append(f.result())
                    bar.update(futures[f])
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"download: a worker process died ({err}); the shards it finished are kept, the others are "
                    "not: run the download again to resume (download.url_list.task_runner: process)") from None
        bar.close()
    return {k: sum(r[k] for r in results) for k in ("urls", "ok")}


def _forkserver():
    """Workers forked from a clean single-threaded server that imported this module once (torch comes with
    webdataset: seconds per import), not each spawned afresh, nor forked from a parent that runs threads."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _drops(rows: pd.DataFrame):
    """(reason, message) of each row that pre-cleaning dropped, None for the others."""
    if "drop_reason" not in rows.columns:
        return [None] * len(rows)
    return [(r, m) if r else None for r, m in zip(rows.drop_reason, rows.drop_message)]


def _job(si: int, j: int, key: str, url: str, caption: str, cfg: UrlListParams):
    return si, j, *download_one(key, url, caption, cfg)


def shard_stats(out_dir: Path, names: list[str]) -> dict:
    """Counts per status and reason over the finished shards' parquets."""
    reasons: Counter = Counter()
    for name in names:
        path = out_dir / f"{name}.parquet"
        if path.exists():
            reasons.update(pd.read_parquet(path, columns=["reason"]).reason)
    count = sum(reasons.values())
    ok = reasons.get("ok", 0)
    return {"count": count, "successes": ok, "failed": count - ok,
            "success_rate": ok / count if count else 0.0, "reasons": dict(sorted(reasons.items()))}


def download_source(d: DownloadParams, seed: int, root: str | Path, map_parts=None) -> dict:
    """root/raw/train from the URL list (finished shards of an earlier run are kept); the teacher split and
    the evaluation tasks are still the synthetic ones, so every later stage runs unchanged. Returns the
    download stage's metrics; the list's own stats are in root/raw/train/_stats.json. map_parts: the engine of
    `task_runner: dask` (download_url_list)."""
    u, c = d.url_list, d.preclean
    if not Path(u.path).is_file():
        raise FileNotFoundError(f"download.url_list.path: no such file {u.path}")
    root = Path(root)
    if synthetic_train_in(root / "raw" / "train"):
        raise SourceConflict(
            f"download.source url_list: {root / 'raw' / 'train'} holds the synthetic training split (nshards.txt); "
            "the URL list's shards cannot share the folder. Delete it first (the synthetic split is regenerated "
            "from the seed), or give this run its own paths.data")
    urls = read_url_list(u.path, u, list_columns(c))
    report = None
    if c.enabled:
        urls, report = preclean(urls, c)
    image_filter = None
    if c.enabled and (c.nsfw_model or c.watermark_model):
        from .image_filter import ImageFilter  # torch and open_clip: only when classifiers are asked for

        image_filter = ImageFilter.from_params(c)
    stats = download_url_list(urls, root / "raw" / "train", u, image_filter=image_filter, map_parts=map_parts)
    clear_synthetic(root, train=False)
    counts = generate(d, seed, root, train=False)
    metrics = {
        "urls": stats["count"],
        "train_samples": stats["successes"],
        "failed": stats["failed"],
        "success_rate": stats["success_rate"],
        "reasons": stats["reasons"],
        "images_per_s": stats["images_per_s"],
        "train_shards": stats["shards"],
        "resumed_shards": stats["resumed_shards"],
        "teacher_samples": counts["teacher"],
        "eval_samples": eval_counts(counts),
    }
    if report is not None:  # the rows pre-cleaning dropped are counted in reasons too
        metrics["preclean"] = {**report, "image_classifiers": image_filter.names if image_filter else []}
    return metrics
