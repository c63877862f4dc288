"""Precision and recall of the CAT parser and spotter against the synthetic data's planted ground truth."""

from __future__ import annotations

import re

import pandas as pd

from ..data.scenes import COLOURS, COUNT_WORDS, SHAPES, SIZES
from ..data.shards import FAULTS

GRAMMAR_NOUNS = set(SHAPES) | {"shape", "picture", "drawing", "left", "right", "top", "bottom", "side", "edge", "half"}
GRAMMAR_ATTRIBUTES = set(COLOURS) | set(SIZES) | set(COUNT_WORDS.values())


def precision_recall(truth, pred) -> dict:
    truth, pred = pd.Series(truth).astype(bool).to_numpy(), pd.Series(pred).astype(bool).to_numpy()
    tp, fp, fn = int((truth & pred).sum()), int((~truth & pred).sum()), int((truth & ~pred).sum())
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"), "support": int(truth.sum())}


def _mentions(caption: str, vocab: set[str]) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", caption.lower()) if w in vocab}


def painted(df: pd.DataFrame) -> pd.Series:
    """Pairs whose caption words are painted into the image: text_in_image, and junk that is the painted text."""
    junk_kind = df.junk_kind if "junk_kind" in df else pd.Series(None, index=df.index, dtype=object)
    return (df.noise == "text_in_image") | (junk_kind == "painted_text_only")


def cat_quality(df: pd.DataFrame) -> dict:
    """Quality of each CAT component on pairs whose noise kind is known (the synthetic source).

    - action detection: every grammar caption has an action, junk captions have none;
    - text spotting: among pairs that reached the spotter, those with painted caption words (painted);
    - objects / attributes: the grammar's nouns and modifiers the parser finds (recall) and the share
      of parsed ones that belong to the grammar (precision);
    - the whole filter as a detector of junk and painted-text pairs.
    """
    known = df[df.noise.notna() & ~df.reason.isin(FAULTS)]
    if known.empty:
        return {}
    grammar = known[known.noise != "junk"]
    spotted = known[known.reason.isin(["kept", "text_spotted"])]
    found_obj = expected_obj = parsed_obj = parsed_obj_ok = 0
    found_att = expected_att = parsed_att = parsed_att_ok = 0
    for row in grammar.itertuples():
        objs, atts = set(row.objects), set(row.attributes)
        exp_o, exp_a = _mentions(row.caption, set(SHAPES)), _mentions(row.caption, set(COLOURS) | set(SIZES))
        expected_obj += len(exp_o)
        found_obj += len(exp_o & objs)
        parsed_obj += len(objs)
        parsed_obj_ok += len(objs & GRAMMAR_NOUNS)
        expected_att += len(exp_a)
        found_att += len(exp_a & atts)
        parsed_att += len(atts)
        parsed_att_ok += len(atts & GRAMMAR_ATTRIBUTES)
    return {
        "parser_action": precision_recall(known.noise != "junk", known.has_action),
        "parser_objects": {"precision": parsed_obj_ok / max(1, parsed_obj), "recall": found_obj / max(1, expected_obj)},
        "parser_attributes": {"precision": parsed_att_ok / max(1, parsed_att),
                              "recall": found_att / max(1, expected_att)},
        "spotter": precision_recall(painted(spotted), spotted.reason == "text_spotted"),
        "filter_vs_planted_noise": precision_recall(known.noise.isin(["junk", "text_in_image"]), ~known.kept),
    }
