"""One run at a time per data folder: an exclusive flock on ``<data>/.diht.lock`` while a stage runs."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".diht.lock"
_held: dict[str, list] = {}  # lock files this process holds -> [fd, depth] (a stage run inside another one's)
_guard = threading.Lock()


class DataFolderBusy(RuntimeError):
    """Another run holds the data folder's lock."""


def holder(path: str | Path) -> dict:
    """The record the holder of a lock file wrote in it ({} when there is none or it is unreadable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(rec: dict) -> str:
    if not rec:
        return "another run (it has not yet written who it is)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since", 0)))
    return f"stage {rec.get('stage')!r} (pid {rec.get('pid')} on {rec.get('host')}, since {since})"


@contextmanager
def data_lock(data_dir: str | Path, stage: str) -> Iterator[Path]:
    """Hold ``<data_dir>/.diht.lock`` for the block, or raise DataFolderBusy at once, naming the run that holds it.
    The kernel releases a flock when its holder dies, so the lock of a killed run never blocks; the file stays.
    Re-entrant within a process (a stage run inside another one's holds the outer lock)."""
    path = Path(data_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataFolderBusy(f"data folder {path.parent} is in use by {_describe(holder(path))}; "
                                     "wait for it to finish, or give this run its own paths (data, models, metrics, "
                                     "plots)") from None
            rec = {"pid": os.getpid(), "stage": stage, "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(rec).encode(), 0)
            _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                os.ftruncate(fd, 0)
                os.close(fd)  # closing the last descriptor releases the flock
