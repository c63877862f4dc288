"""URL lists in img2dataset's input formats, read into a DataFrame of (url, caption)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import URL_LIST_FORMATS, UrlListParams, infer_format

FORMATS = URL_LIST_FORMATS


def read_url_list(path: str | Path, cfg: UrlListParams = UrlListParams(), extra: Sequence[str] = ()) -> pd.DataFrame:
    """DataFrame with columns url, caption (str; "" where missing), one row per input row, in order; of cfg it
    reads format (None: from the suffix), url_col and caption_col. The columns named in extra that the list has
    (LAION's NSFW, pwatermark) follow, as they are.

    - tsv: CC3M's `Train_GCC-training.tsv` (caption<TAB>url, no header) or any TSV with a header row;
    - csv: with a header row naming the columns (or, without one, the column of URLs is found);
    - parquet: LAION's metadata parts (URL and TEXT columns), or any parquet with the named columns;
    - txt: one URL per line, no caption.
    Without a header row the URL column is the one whose values start with http(s)://, and the caption
    is the first other column.
    """
    path, url_col, caption_col = Path(path), cfg.url_col, cfg.caption_col
    fmt = cfg.format or infer_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"{path}: cannot tell the list format from its name; give one of {FORMATS}")
    if fmt == "parquet":
        df = pd.read_parquet(path)
    elif fmt == "txt":
        urls = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        df = pd.DataFrame({url_col: urls})
    else:
        df = _read_delimited(path, "\t" if fmt == "tsv" else ",", url_col, caption_col)
    if url_col not in df.columns:
        raise ValueError(f"{path}: no URL column {url_col!r}; columns are {list(df.columns)}")
    if caption_col is not None and fmt != "txt" and caption_col not in df.columns:
        raise ValueError(f"{path}: no caption column {caption_col!r}; columns are {list(df.columns)}")
    captions = df[caption_col] if caption_col in df.columns else pd.Series([""] * len(df))
    kept = {c: df[c].reset_index(drop=True) for c in extra if c in df.columns and c not in ("url", "caption")}
    return pd.DataFrame({"url": _text(df[url_col]).str.strip(), "caption": _text(captions), **kept})


def _text(col: pd.Series) -> pd.Series:
    return col.astype(object).where(col.notna(), "").astype(str).reset_index(drop=True)


def _read_delimited(path: Path, sep: str, url_col: str, caption_col: str | None) -> pd.DataFrame:
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL  # CC3M captions hold bare quotes
    df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, quoting=quoting)
    if df.empty:
        return pd.DataFrame({url_col: [], **({caption_col: []} if caption_col else {})})
    first = [str(v).strip() for v in df.iloc[0]]
    if url_col in first:  # a header row
        df = df.iloc[1:].reset_index(drop=True)
        df.columns = first
        return df
    looks_like_url = df.head(100).apply(lambda c: c.str.match(r"\s*https?://").mean())
    url_idx = int(looks_like_url.to_numpy().argmax())
    if looks_like_url.iloc[url_idx] == 0:
        raise ValueError(f"{path}: no header row naming {url_col!r} and no column of http(s) URLs")
    names = {url_idx: url_col}
    others = [i for i in range(df.shape[1]) if i != url_idx]
    if others and caption_col:
        names[others[0]] = caption_col
    return df.rename(columns=names)
