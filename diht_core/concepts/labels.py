"""The labels of the teacher split (what a teacher pre-trained here learns): shapes, colours, sizes, relations,
counts."""

from __future__ import annotations

import numpy as np

from ..data.scenes import COLOURS, RELATIONS, SHAPES, SIZES

LABELS = ([f"shape:{s}" for s in SHAPES] + [f"colour:{c}" for c in COLOURS] + [f"size:{s}" for s in SIZES]
          + [f"relation:{r}" for r in RELATIONS] + [f"count:{k}" for k in (1, 2, 3)])


def label_vector(labels: dict) -> np.ndarray:
    """Multi-hot over LABELS from a teacher-split json's "labels"."""
    on = ({f"shape:{s}" for s in labels["shapes"]} | {f"colour:{c}" for c in labels["colours"]}
          | {f"size:{s}" for s in labels["sizes"]} | {f"count:{labels['count']}"}
          | ({f"relation:{labels['relation']}"} if labels.get("relation") else set()))
    return np.array([1.0 if name in on else 0.0 for name in LABELS], dtype=np.float32)
