"""Map a function over jobs on a Dask cluster through Prefect's DaskTaskRunner (cat_filter's shards, download's
URL-list parts)."""

from __future__ import annotations


def map_with_dask(fn, jobs: list, workers: int, address: str | None, name: str) -> list:
    """[fn(job) for job in jobs], each job a Prefect task of the sub-flow `<name>s` on a DaskTaskRunner.

    address=None starts a local cluster of `workers` processes of one thread each (the job brings its own
    threads); a scheduler address (tcp://...) runs on that cluster's workers.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None})
    job_task = task(fn, name=name, cache_policy=NO_CACHE)

    @flow(name=f"{name}s", task_runner=runner)
    def jobs_flow(jobs):
        return [f.result() for f in job_task.map(jobs)]

    return jobs_flow(jobs)
