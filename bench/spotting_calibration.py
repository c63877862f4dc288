"""Calibrate each text spotter's min_confidence on the labelled photo set (diht_core/cat/spotting_set.py).

    .venv/bin/python bench/spotting_calibration.py [--n 240] [--seed 0] [--spotters rapidocr doctr]
                                                   [--min-sides 0 512] [--doctr-weights DIR] [--out bench/results_spotting_calibration.json]
                                                   [--images DIR]

Builds the set, runs each spotter once per image, sweeps min_confidence x min_chars, and picks the threshold with
the best F1 of "drop" among those that drop at most 2% of the pairs to keep (near misses, unrelated text, no text);
a spotter's calibrated value is the highest threshold that is such a pick at each of its settings (RapidOCR: images
as they are and upscaled to a 512 px shorter side).
Writes every read and the sweep to --out (the test tests/test_spotting_calibration.py checks the recorded pick) and
prints the README's table. docTR is calibrated only where its trained weights are on disk: with random weights it
reads nothing, so without them it is reported as uncalibrated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diht_core.cat.calibration import (MAX_FALSE_DROP, by_kind, common_threshold, pick_threshold,  # noqa: E402
                                      spot_set, sweep)
from diht_core.cat.spotting import CALIBRATED_MIN_CONFIDENCE, DocTRSpotter, RapidOCRSpotter  # noqa: E402
from diht_core.cat.spotting_set import build_spotting_set  # noqa: E402

OUT = Path(__file__).with_name("results_spotting_calibration.json")


def _spotters(names: list[str], min_sides: list[int], doctr_weights: str | None):
    """(label, spotter or the error that prevents it) for each spotter and, for RapidOCR, each min_side."""
    for name in names:
        if name == "rapidocr":
            for m in min_sides:
                yield (f"rapidocr@{m}" if m else "rapidocr"), (lambda m=m: RapidOCRSpotter(min_side=m or None))
        else:
            yield name, (lambda: DocTRSpotter(doctr_weights))


def table(rows: list[dict], min_chars: int, pick: float | None) -> str:
    lines = ["| min_confidence | precision | recall | F1 | false drops | |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["min_chars"] != min_chars:
            continue
        mark = "← calibrated" if pick is not None and r["min_confidence"] == pick else (
            "← paper's 0.8" if r["min_confidence"] == 0.8 else "")
        lines.append(f"| {r['min_confidence']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['fp']}/{r['fp'] + r['tn']} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spotters", nargs="+", default=["rapidocr", "doctr"], choices=["rapidocr", "doctr"])
    ap.add_argument("--min-sides", nargs="+", type=int, default=[0, 512],
                    help="RapidOCR's min_side settings to calibrate (0: images as they are)")
    ap.add_argument("--doctr-weights", default=None, help="docTR weights directory (default $DOCTR_CACHE_DIR)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--images", type=Path, default=None, help="also write the set's images here, to look at")
    args = ap.parse_args(argv)
    samples = build_spotting_set(args.seed, args.n)
    if args.images:
        args.images.mkdir(parents=True, exist_ok=True)
        for s in samples:
            s.image.save(args.images / f"{s.id}_{'drop' if s.drop else 'keep'}_{s.content}_{s.style}.png")
    result = {"seed": args.seed, "n": args.n, "positives": sum(s.drop for s in samples),
              "max_false_drop": MAX_FALSE_DROP, "spotters": {}}
    for name, make in _spotters(args.spotters, args.min_sides, args.doctr_weights):
        try:
            spotter = make()
        except FileNotFoundError as err:
            print(f"{name}: not calibrated: {err}")
            result["spotters"][name] = {"calibrated": False, "why": str(err),
                                        "min_confidence": CALIBRATED_MIN_CONFIDENCE[name]}
            continue
        t = time.perf_counter()
        spotted = spot_set(samples, spotter)
        secs = time.perf_counter() - t
        rows = sweep(spotted)
        pick = pick_threshold(rows)
        print(f"\n{name}: {len(samples)} images in {secs:.0f} s; calibrated min_confidence "
              f"{pick['min_confidence']} (F1 {pick['f1']}, precision {pick['precision']}, recall {pick['recall']}, "
              f"false drops {pick['fp']}/{pick['fp'] + pick['tn']})\n")
        for m in sorted({r["min_chars"] for r in rows}):
            print(f"min_chars={m}\n{table(rows, m, pick['min_confidence'] if m == 5 else None)}\n")
        per_content = by_kind(spotted, pick["min_confidence"], 5, "content")
        per_style = by_kind(spotted, pick["min_confidence"], 5, "style")
        print("drop rate per content:", json.dumps(per_content))
        print("drop rate per style:", json.dumps(per_style))
        result["spotters"][name] = {"calibrated": True, "min_confidence": pick["min_confidence"], "pick": pick,
                                    "seconds": round(secs, 1), "sweep": rows, "per_content": per_content,
                                    "per_style": per_style, "reads": [asdict(s) for s in spotted]}
    for name in args.spotters:  # one threshold per spotter: the best pick at each of its settings
        sweeps = [r["sweep"] for k, r in result["spotters"].items() if k.split("@")[0] == name and r["calibrated"]]
        if sweeps:
            result.setdefault("calibrated", {})[name] = common_threshold(sweeps)
            print(f"{name}: calibrated min_confidence {result['calibrated'][name]} (best at every setting)")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
