"""Atomic file writes: a unique temporary name beside the target, renamed onto it only when complete."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")  # atomic_path's names: .<name>.<pid>-<id>.tmp


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", keep_name: bool = False) -> Iterator[Path]:
    """Write to the yielded path; it replaces ``path`` when the block ends, and is removed if the block fails.
    The temporary name is unique to this process and call, so two writers never share one (hidden: it starts with
    "."). keep_name: the yielded path has the target's own name, in a unique temporary folder beside it, for
    writers that record the file's name in the file (torch.save names its archive's folder after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    target = tmp / path.name if keep_name else tmp
    try:
        if keep_name:
            tmp.mkdir()
        yield target
        os.replace(target, path)
    finally:
        if keep_name:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(*roots: str | Path) -> list[Path]:
    """Remove what atomic_path left under these folders when its writer died (kill -9: no ``finally`` ran): the
    temporary files and folders whose writer's pid is no longer alive on this host. Returns the removed paths."""
    removed = []
    for root in roots:
        for path in sorted(Path(root).rglob(".*.tmp")) if Path(root).is_dir() else []:
            m = _TEMPORARY.match(path.name)
            if m is None or _alive(int(m.group(1))) or not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save, atomically; the bytes are those a plain torch.save(obj, path) writes."""
    import torch

    with atomic_path(path, keep_name=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_savez(path: str | Path, **arrays) -> Path:
    """np.savez, atomically (through a file object: the temporary name needs no .npz suffix)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)
