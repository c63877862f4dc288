"""The text-spotting threshold: the labelled photo set, the sweep, and the recorded calibration it gives."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from diht_core.cat.calibration import SpottedSample, common_threshold, pick_threshold, rates, spot_set, sweep
from diht_core.cat.spotting import CALIBRATED_MIN_CONFIDENCE, caption_text_match, min_confidence
from diht_core.cat.spotting_set import CONTENTS, POSITIVE_CONTENTS, build_spotting_set, longest_common_run
from diht_core.config import CatFilterParams

RESULTS = ROOT / "bench" / "results_spotting_calibration.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(Path(RESULTS).read_text())


def _reads(recorded, label):
    return [SpottedSample(**{**r, "spotted": tuple(map(tuple, r["spotted"]))})
            for r in recorded["spotters"][label]["reads"]]


def test_longest_common_run_compares_as_the_rule_does():
    assert longest_common_run("Flow ers", "a red flower") == 6
    assert longest_common_run("GARDON", "the garden") == 4
    assert longest_common_run("SALE", "") == 0


def test_the_set_is_a_function_of_its_seed_and_its_labels_hold():
    a, b = build_spotting_set(0, 14), build_spotting_set(0, 14)
    assert [s.id for s in a] == [s.id for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert {s.content for s in a} == set(CONTENTS)
    for s in a:
        assert s.image.size == (256, 256)
        assert s.drop == (s.content in POSITIVE_CONTENTS)
        if s.drop:
            assert longest_common_run(s.visible, s.caption) >= 5
        elif s.painted:
            assert longest_common_run(s.painted, s.caption) <= 4
        else:
            assert s.content == "none" and s.style == "none"
    assert not np.array_equal(np.asarray(build_spotting_set(1, 1)[0].image), np.asarray(a[0].image))


def test_the_recorded_reads_belong_to_this_set(recorded):
    """The calibration file was made from the set this code builds (first samples: same ids, kinds and labels)."""
    first = build_spotting_set(recorded["seed"], 14)
    for label, res in recorded["spotters"].items():
        if res["calibrated"]:
            reads = res["reads"]
            assert len(reads) == recorded["n"]
            assert [(r["id"], r["content"], r["style"], r["drop"], r["caption"]) for r in reads[:14]] == [
                (s.id, s.content, s.style, s.drop, s.caption) for s in first], label


def test_rates_and_pick():
    cap = "a gardener planting yellow tulips"
    spotted = [SpottedSample("0", cap, True, "caption_word", "plain", (("GARDENER", 0.95),)),
               SpottedSample("1", cap, True, "caption_word", "rotated", (("yellow", 0.7),)),
               SpottedSample("2", cap, False, "near_miss", "plain", (("tulibs", 0.99),)),
               SpottedSample("3", cap, False, "near_miss", "plain", (("plantlng", 0.6),)),  # "plant": 5 shared
               SpottedSample("4", cap, False, "none", "none", ())]
    hi, lo = rates(spotted, 0.8, 5), rates(spotted, 0.5, 5)
    assert (hi["tp"], hi["fp"], hi["fn"], hi["tn"]) == (1, 0, 1, 3) and hi["precision"] == 1 and hi["recall"] == 0.5
    assert (lo["tp"], lo["fp"], lo["fn"], lo["tn"]) == (2, 1, 0, 2)
    assert lo["false_drop_rate"] == round(1 / 3, 4) and lo["f1"] == 0.8
    rows = sweep(spotted, thresholds=(0.5, 0.65, 0.7, 0.8), min_chars=(5,))
    assert [r["f1"] for r in rows] == [0.8, 1.0, 1.0, round(2 / 3, 4)]
    assert pick_threshold(rows)["min_confidence"] == 0.7  # best F1, ties (0.65, 0.7) to the higher
    assert pick_threshold(rows[:1] + rows[3:], max_false_drop=0.0)["min_confidence"] == 0.8  # 0.5 drops a keeper
    with pytest.raises(ValueError, match="min_chars=6"):
        pick_threshold(rows, min_chars=6)
    assert common_threshold([rows, rows]) == 0.7
    other = [{**r, "f1": 0.5} if r["min_confidence"] == 0.7 else r for r in rows]  # 0.7 is no best pick there
    assert common_threshold([rows, other]) == 0.65


def test_null_min_confidence_is_the_spotters_calibrated_one():
    assert CatFilterParams().min_confidence is None
    for spotter in ("rapidocr", "doctr"):
        assert min_confidence(CatFilterParams(spotter=spotter)) == CALIBRATED_MIN_CONFIDENCE[spotter]
    assert min_confidence(CatFilterParams(min_confidence=0.9)) == 0.9
    cap, read = "tourists walking past the ancient temple", [("TEMPLE", 0.75)]
    assert caption_text_match(read, cap, CatFilterParams(min_confidence=0.7))
    assert not caption_text_match(read, cap, CatFilterParams(min_confidence=0.8))


def test_the_recorded_sweep_gives_the_committed_thresholds(recorded):
    for label, res in recorded["spotters"].items():
        spotter = label.split("@")[0]
        if not res["calibrated"]:
            assert spotter == "doctr" and res["min_confidence"] == CALIBRATED_MIN_CONFIDENCE["doctr"]
            continue
        rows = sweep(_reads(recorded, label))
        assert rows == res["sweep"], label
        assert pick_threshold(rows, max_false_drop=recorded["max_false_drop"]) == res["pick"], label
    sweeps = [res["sweep"] for label, res in recorded["spotters"].items() if label.startswith("rapidocr")]
    assert len(sweeps) == 2  # images as they are, and upscaled to 512 px
    assert common_threshold(sweeps) == recorded["calibrated"]["rapidocr"] == CALIBRATED_MIN_CONFIDENCE["rapidocr"]
    assert "doctr" not in recorded["calibrated"]


@pytest.mark.slow
def test_rapidocr_reaches_the_recorded_precision_and_recall(recorded):
    """RapidOCR run now on a subset of the set (the default spotter_min_side) drops what the recorded reads say."""
    from diht_core.cat.spotting import RapidOCRSpotter

    cfg = CatFilterParams()
    label = f"rapidocr@{cfg.spotter_min_side}" if cfg.spotter_min_side else "rapidocr"
    subset = build_spotting_set(recorded["seed"], recorded["n"])[::8]
    ids = {s.id for s in subset}
    now = spot_set(subset, RapidOCRSpotter(min_side=cfg.spotter_min_side))
    then = [r for r in _reads(recorded, label) if r.id in ids]
    t = min_confidence(cfg)
    got, want = rates(now, t, cfg.min_chars), rates(then, t, cfg.min_chars)
    assert got["recall"] >= want["recall"] - 0.1 and got["precision"] >= want["precision"] - 0.1, (got, want)
