"""Stage `cat_filter`: Complexity, Action and Text-spotting filter over the raw shards."""

from __future__ import annotations

from pathlib import Path

from diht_core.cat.report import cat_metrics, write_report
from diht_core.cat.shards import filter_job, filter_shards, merge_decisions, shard_jobs, shard_truncation
from diht_core.data.shards import shard_paths

from ._dask import map_with_dask
from ._stage import cli, make_task


def map_shards_with_dask(jobs: list, workers: int, address: str | None) -> list[dict]:
    """Map the shard filter over a Dask cluster through Prefect's DaskTaskRunner (a sub-flow).

    address=None starts a local cluster of `workers` processes; a scheduler address filters on a cluster.
    """
    return map_with_dask(filter_job, jobs, workers, address, "cat_filter_shard")


def body(p, run) -> dict:
    c = p.cat_filter
    data = Path(p.paths.data)
    shards = shard_paths(data / "raw" / "train")
    if not shards:
        raise FileNotFoundError(f"no raw shards in {data / 'raw' / 'train'}: run the download stage first")
    jobs = shard_jobs(shards, data / "filtered", data / "cat" / "decisions", c, p.download.url_list.max_pixels)
    if c.task_runner == "dask":
        results = map_shards_with_dask(jobs, c.workers, c.dask_address)
    else:
        results = filter_shards(jobs, c.workers)
    df = merge_decisions([j[2] for j in jobs], data / "cat" / "decisions.parquet")
    resumed = sum(r.get("skipped_done", 0) for r in results)
    print(f"[cat_filter] {len(jobs)} shards, {resumed} already done (reused)")
    metrics = cat_metrics(df)
    metrics["truncated_shards"] = shard_truncation([j[2] for j in jobs])
    for name, cut in metrics["truncated_shards"].items():
        print(f"[cat_filter] raw shard {name} is truncated after {cut['read']} samples; the rest is lost "
              f"({cut['error']})")
    for f in write_report(df, metrics["funnel"], shards, Path(p.paths.plots)):
        run.log_artifact(f, "plots")
    return metrics


cat_filter = make_task("cat_filter", body)

if __name__ == "__main__":
    cli("cat_filter", body)
