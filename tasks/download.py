"""Stage `download`: the built-in synthetic source, or a URL list fetched img2dataset's way (`download.source`)."""

from __future__ import annotations

import sys
from pathlib import Path

from diht_core.data.synthetic import SourceConflict, write_source
from diht_core.data.url_download import download_source

from ._dask import map_with_dask
from ._stage import cli, make_task


def map_parts_with_dask(u):
    """The URL list's parts on Prefect's DaskTaskRunner: a local cluster of `processes` workers, or dask_address."""
    return lambda fn, parts: map_with_dask(fn, parts, u.processes, u.dask_address, "download_part")


def body(p, run) -> dict:
    if p.download.source == "synthetic":
        return write_source(p.download, p.seed, p.paths.data)
    u = p.download.url_list
    metrics = download_source(p.download, p.seed, p.paths.data,
                              map_parts=map_parts_with_dask(u) if u.task_runner == "dask" else None)
    run.log_artifact(Path(p.paths.data) / "raw" / "train" / "_stats.json")
    return metrics


download = make_task("download", body)

CONFLICT_EXIT = 65  # EX_DATAERR: data/raw/train holds the other source's training split

if __name__ == "__main__":
    try:
        cli("download", body)
    except SourceConflict as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(CONFLICT_EXIT)
