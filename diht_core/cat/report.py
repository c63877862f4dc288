"""The CAT filter's report: funnel, drop rates and quality metrics, the funnel plot and a page of dropped pairs."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from ..data.files import atomic_write_text
from ..data.shards import FAULTS, iter_shard
from ..plots import pyplot, save_figure
from .filter import REASONS
from .quality import cat_quality


def cat_metrics(df: pd.DataFrame) -> dict:
    """The cat_filter stage's metrics from the merged decisions."""
    funnel = {"in": len(df), "kept": int(df.kept.sum())}
    funnel.update({f"dropped_{r}": int((df.reason == r).sum()) for r in REASONS if r != "kept"})
    by_noise = {k: float(1 - g.kept.mean()) for k, g in df.groupby("noise")}
    return {"funnel": funnel, "kept_fraction": funnel["kept"] / max(1, funnel["in"]),
            "drop_rate_by_noise": by_noise, "reasons_by_planted_kind": reasons_by_planted_kind(df),
            "quality": cat_quality(df) or None}  # None: no planted ground truth (a URL list)


def reasons_by_planted_kind(df: pd.DataFrame) -> dict:
    """{planted kind: {reason: share of its pairs}}: what each rule drops of each kind, junk by its junk_kind
    ("junk/noun_phrase"); {} without planted truth (a URL list)."""
    if "junk_kind" not in df:
        return {}
    kind = df.noise.where(df.junk_kind.isna(), "junk/" + df.junk_kind.astype(str))
    known = df.assign(kind=kind)[kind.notna()]
    return {k: g.reason.value_counts(normalize=True).sort_index().to_dict() for k, g in known.groupby("kind")}


def write_report(df: pd.DataFrame, funnel: dict, shards: list[Path], plots: Path) -> list[Path]:
    """cat_funnel.csv, cat_funnel.png and cat_dropped_examples.html under plots; their paths."""
    plots.mkdir(parents=True, exist_ok=True)
    csv = pd.DataFrame([{"step": k, "count": v} for k, v in funnel.items()]).to_csv(index=False)
    atomic_write_text(plots / "cat_funnel.csv", csv)
    funnel_png(funnel, plots / "cat_funnel.png")
    examples_html(df, shards, plots / "cat_dropped_examples.html")
    return [plots / f for f in ("cat_funnel.csv", "cat_funnel.png", "cat_dropped_examples.html")]


def funnel_png(funnel: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(funnel)[::-1], list(funnel.values())[::-1], color="#4c72b0")
    ax.set_xlabel("pairs")
    ax.set_title("CAT filter funnel")
    save_figure(fig, path)


def examples_html(df: pd.DataFrame, shards, path: Path, per_reason: int = 6) -> None:
    """A page of example dropped pairs for each reason."""
    want = {r: df[df.reason == r].key.head(per_reason).tolist() for r in REASONS if r != "kept"}
    keys = {k for r, ks in want.items() if r not in FAULTS for k in ks}  # no image shown for a bad one
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
    atomic_write_text(path, "\n".join(parts))
