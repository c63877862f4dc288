"""Calibrating the text-spotting rule on a labelled set: precision and recall of "drop" per threshold."""

from __future__ import annotations

from dataclasses import dataclass

from .spotting import TextSpotter, match_window

# the grid the calibration sweeps (min_confidence) and the windows it compares (min_chars; the paper's is 5)
THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
MIN_CHARS = (4, 5, 6)
MAX_FALSE_DROP = 0.02  # the most near misses and text-free pairs a calibrated threshold may drop


@dataclass(frozen=True)
class SpottedSample:
    """One labelled pair with what a spotter read in its image."""
    id: str
    caption: str
    drop: bool
    content: str
    style: str
    spotted: tuple[tuple[str, float], ...]


def spot_set(samples, spotter: TextSpotter) -> list[SpottedSample]:
    """Run the spotter once on each labelled sample (spotting_set.SpottingSample)."""
    return [SpottedSample(s.id, s.caption, s.drop, s.content, s.style,
                          tuple((t, round(c, 4)) for t, c in spotter(s.image))) for s in samples]


def rates(spotted: list[SpottedSample], min_confidence: float, min_chars: int) -> dict:
    """The rule's drop decisions against the labels: counts, precision, recall, F1 and the false-drop rate."""
    tp = fp = fn = tn = 0
    for s in spotted:
        pred = match_window(s.spotted, s.caption, min_confidence, min_chars) is not None
        tp += pred and s.drop
        fp += pred and not s.drop
        fn += s.drop and not pred
        tn += not (pred or s.drop)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"min_confidence": min_confidence, "min_chars": min_chars, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "false_drop_rate": round(fp / (fp + tn), 4) if fp + tn else 0.0}


def sweep(spotted: list[SpottedSample], thresholds=THRESHOLDS, min_chars=MIN_CHARS) -> list[dict]:
    return [rates(spotted, t, m) for m in min_chars for t in thresholds]


def pick_threshold(rows: list[dict], min_chars: int = 5, max_false_drop: float = MAX_FALSE_DROP) -> dict:
    """The row (at min_chars) with the best F1 among those dropping at most max_false_drop of the pairs to keep;
    ties go to the higher threshold (the fewer low-confidence reads it trusts)."""
    ok = [r for r in rows if r["min_chars"] == min_chars and r["false_drop_rate"] <= max_false_drop]
    if not ok:
        raise ValueError(f"no threshold keeps false drops <= {max_false_drop} at min_chars={min_chars}")
    return max(ok, key=lambda r: (r["f1"], r["min_confidence"]))


def common_threshold(sweeps: list[list[dict]], min_chars: int = 5, max_false_drop: float = MAX_FALSE_DROP) -> float:
    """The highest threshold that is a best pick of every sweep (one spotter at several settings, e.g. image
    sizes): its F1 equals each sweep's best F1 under the false-drop limit."""
    best = [pick_threshold(rows, min_chars, max_false_drop)["f1"] for rows in sweeps]
    ok = [t for t in {r["min_confidence"] for r in sweeps[0]}
          if all(any(r["min_confidence"] == t and r["min_chars"] == min_chars and r["f1"] == f1
                     and r["false_drop_rate"] <= max_false_drop for r in rows) for rows, f1 in zip(sweeps, best))]
    if not ok:
        raise ValueError("no threshold is a best pick at every setting; calibrate the settings apart")
    return max(ok)


def by_kind(spotted: list[SpottedSample], min_confidence: float, min_chars: int, field: str) -> dict[str, dict]:
    """Drop rate per content or style at one setting (a positive kind's rate is its recall)."""
    out: dict[str, dict] = {}
    for s in spotted:
        k = out.setdefault(getattr(s, field), {"n": 0, "dropped": 0})
        k["n"] += 1
        k["dropped"] += match_window(s.spotted, s.caption, min_confidence, min_chars) is not None
    return {k: {**v, "drop_rate": round(v["dropped"] / v["n"], 3)} for k, v in sorted(out.items())}
