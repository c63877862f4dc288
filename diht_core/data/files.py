"""Atomic file writes: a unique temporary name beside the target, renamed onto it only when complete."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
