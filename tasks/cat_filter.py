"""Stage `cat_filter`: Complexity, Action and Text-spotting filter over the raw shards."""

from __future__ import annotations

import base64
import html
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from diht_core.cat.filter import REASONS
from diht_core.cat.quality import cat_quality
from diht_core.cat.shards import CatConfig, filter_shard
from diht_core.data.shards import iter_shard, shard_paths

from diht_core.plots import pyplot, save_figure

from ._stage import cli, make_task


def _job(args):
    return filter_shard(*args)


def map_shards_with_dask(jobs: list, workers: int, address: str | None) -> list[dict]:
    """Map the shard filter over a Dask cluster through Prefect's DaskTaskRunner (a sub-flow).

    address=None starts a local cluster of `workers` processes; a scheduler address filters on a cluster.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None})
    shard_task = task(_job, name="cat_filter_shard", cache_policy=NO_CACHE)

    @flow(name="cat_filter_shards", task_runner=runner)
    def shards_flow(jobs):
        return [f.result() for f in shard_task.map(jobs)]

    return shards_flow(jobs)


def body(p, run) -> dict:
    c = p.cat_filter
    cfg = CatConfig(c.min_complexity, c.require_action, c.text_spotting, c.spotter, c.min_confidence, c.min_chars,
                    c.parse_batch_size)
    data = Path(p.paths.data)
    shards = shard_paths(data / "raw" / "train")
    if not shards:
        raise FileNotFoundError(f"no raw shards in {data / 'raw' / 'train'}: run the download stage first")
    out_dir, dec_dir = data / "filtered", data / "cat" / "decisions"
    names = {s.stem for s in shards}
    for d, ext in ((out_dir, ".tar"), (dec_dir, ".parquet")):  # outputs of shards that no longer exist
        for f in d.glob(f"*{ext}") if d.exists() else []:
            if f.stem not in names:
                f.unlink()
    jobs = [(s, out_dir / s.name, dec_dir / f"{s.stem}.parquet", cfg) for s in shards]
    if c.task_runner == "dask":
        results = map_shards_with_dask(jobs, c.workers, c.dask_address)
    elif c.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(c.workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    df = pd.concat([pd.read_parquet(j[2]) for j in jobs], ignore_index=True)
    df.to_parquet(data / "cat" / "decisions.parquet", index=False)
    funnel = {"in": len(df), "kept": int(df.kept.sum())}
    funnel.update({f"dropped_{r}": int((df.reason == r).sum()) for r in REASONS if r != "kept"})
    by_noise = {k: float(1 - g.kept.mean()) for k, g in df.groupby("noise")}
    resumed = sum(r.get("skipped_done", 0) for r in results)
    print(f"[cat_filter] {len(jobs)} shards, {resumed} already done (reused)")
    metrics = {"funnel": funnel, "kept_fraction": funnel["kept"] / max(1, funnel["in"]),
               "drop_rate_by_noise": by_noise,
               "quality": cat_quality(df) or None}  # None: no planted ground truth (a URL list)
    plots = Path(p.paths.plots)
    plots.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"step": k, "count": v} for k, v in funnel.items()]).to_csv(plots / "cat_funnel.csv", index=False)
    _funnel_png(funnel, plots / "cat_funnel.png")
    _examples_html(df, shards, plots / "cat_dropped_examples.html")
    for f in ("cat_funnel.csv", "cat_funnel.png", "cat_dropped_examples.html"):
        run.log_artifact(plots / f, "plots")
    return metrics


def _funnel_png(funnel: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(funnel)[::-1], list(funnel.values())[::-1], color="#4c72b0")
    ax.set_xlabel("pairs")
    ax.set_title("CAT filter funnel")
    save_figure(fig, path)


def _examples_html(df: pd.DataFrame, shards, path: Path, per_reason: int = 6) -> None:
    """A page of example dropped pairs for each reason."""
    want = {r: df[df.reason == r].key.head(per_reason).tolist() for r in REASONS if r != "kept"}
    keys = {k for ks in want.values() for k in ks}
    images = {}
    for shard in shards:
        for s in iter_shard(shard):
            if s["__key__"] in keys and "jpg" in s:
                images[s["__key__"]] = base64.b64encode(s["jpg"]).decode()
    caption = dict(zip(df.key, df.caption))
    parts = ["<html><body><h1>CAT filter: dropped examples</h1>"]
    for reason, ks in want.items():
        parts.append(f"<h2>{reason} ({int((df.reason == reason).sum())})</h2><div>")
        for k in ks:
            img = f'<img src="data:image/jpeg;base64,{images[k]}" width="128">' if k in images else ""
            parts.append(f'<figure style="display:inline-block;width:150px">{img}'
                         f"<figcaption>{html.escape(caption[k])}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


cat_filter = make_task("cat_filter", body)

if __name__ == "__main__":
    cli("cat_filter", body)
