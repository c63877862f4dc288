"""matplotlib on the headless Agg backend, for the plots every stage writes."""

from __future__ import annotations

from pathlib import Path

from .data.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Save atomically, in the format of path's suffix."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or None)
    pyplot().close(fig)
