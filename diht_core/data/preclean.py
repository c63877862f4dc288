"""DiHT's LAION pre-cleaning: rows of a URL list dropped from the list's own columns before any request."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import PrecleanParams

REASONS = ("nsfw", "watermark", "toxic_caption")  # a row dropped by several rules gets the first


def list_columns(cfg: PrecleanParams) -> list[str]:
    """The list columns the rules read (kept by read_url_list next to url and caption)."""
    return [c for c in (cfg.nsfw_column, cfg.watermark_column) if c] if cfg.enabled else []


def toxic_probability(captions: list[str]) -> np.ndarray:
    """alt-profanity-check's probability that each caption is offensive (its linear SVM ships in the wheel)."""
    from profanity_check import predict_prob  # imported here: loading its model takes about 2 s

    return np.asarray(predict_prob(captions), dtype=float) if captions else np.zeros(0)


def preclean(urls: pd.DataFrame, cfg: PrecleanParams) -> tuple[pd.DataFrame, dict]:
    """(urls with columns drop_reason and drop_message, "" for kept rows; the report).

    nsfw: the nsfw_column's value is one of nsfw_values; watermark: watermark_column > max_watermark (a missing
    value keeps the row); toxic_caption: alt-profanity-check's probability > 0.5. The report holds `dropped`
    (count per reason) and `not_applied` (rule -> why: the list lacks the column, or has no captions)."""
    n = len(urls)
    reason = pd.Series([""] * n, index=urls.index, dtype=object)
    message = reason.copy()
    not_applied = {}

    def drop(rule: str, hit: pd.Series, why: pd.Series) -> None:
        hit = hit & (reason == "")
        reason[hit] = rule
        message[hit] = why[hit]

    if cfg.nsfw_column:
        col = cfg.nsfw_column
        if col in urls.columns:
            value = urls[col].astype(object).where(urls[col].notna(), None)
            drop("nsfw", value.isin(cfg.nsfw_values), f"{col} = " + value.astype(str))
        else:
            not_applied["nsfw"] = f"the list has no column {col!r} (download.preclean.nsfw_column)"
    if cfg.watermark_column:
        col = cfg.watermark_column
        if col in urls.columns:
            p = pd.to_numeric(urls[col], errors="coerce")
            drop("watermark", p > cfg.max_watermark, f"{col} = " + p.round(4).astype(str) + f" > {cfg.max_watermark}")
        else:
            not_applied["watermark"] = f"the list has no column {col!r} (download.preclean.watermark_column)"
    if cfg.toxic_captions:
        has_caption = urls.caption.str.strip() != ""
        if has_caption.any():
            todo = has_caption & (reason == "")
            p = pd.Series(0.0, index=urls.index)
            p[todo] = toxic_probability(urls.caption[todo].tolist())
            drop("toxic_caption", p > 0.5, "alt-profanity-check p = " + p.round(4).astype(str))
        else:
            not_applied["toxic_caption"] = "the list has no captions"
    out = urls.assign(drop_reason=reason, drop_message=message)
    counts = reason[reason != ""].value_counts()
    report = {"dropped": {r: int(counts.get(r, 0)) for r in REASONS}, "not_applied": not_applied}
    for rule, why in not_applied.items():
        print(f"[preclean] rule {rule} NOT applied: {why}", flush=True)
    return out, report
