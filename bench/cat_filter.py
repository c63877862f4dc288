"""CAT filter throughput: parser captions/s per core vs spaCy's full nlp.pipe, and spotter images/s.

    .venv/bin/python bench/cat_filter.py [--captions 4000] [--images 40] [--repeats 2]

Everything runs on one thread (one core), so the numbers are per core. The parser table times, side by
side in one run, spaCy's full pipeline (every component, n_process=1) and ours on four caption sets:
the synthetic grammar with its repeats and its distinct captions only, and web alt-text
(tests/data/web_captions.jsonl, each caption made distinct variants of by adding one of a fixed list of
alt-text prefixes and suffixes) distinct and with repeats (drawn with replacement). Each timing is the
best of --repeats; ours starts each timing with an empty embedding table (tagging.py), and the last
column is the share of tokens whose embedding it computed (the rest came from the table). The last row
empties the table at every batch of 256 captions (words seen in earlier batches embedded again): a bound for
text whose vocabulary repeats less than these sets'; its spaCy column repeats the distinct web row.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diht_core.data.captions import caption, junk_caption  # noqa: E402
from diht_core.data.scenes import render, sample_scene  # noqa: E402

WEB = Path(__file__).resolve().parents[1] / "tests" / "data" / "web_captions.jsonl"
PREFIXES = ("", "photo: ", "stock image - ", "new post: ", "image may contain: ", "Editorial: ", "#travel ",
            "View of ")
SUFFIXES = ("", " in the morning", " on a sunny day", " near Boston", " | photo by John Smith", " (2019)",
            " - stock photo", " at the weekend", " in Paris, France", ", high resolution", " #nofilter",
            " on Tuesday", " in summer", " - Getty Images", " at dusk", " [video]", " during the holidays",
            " in London", " for sale", " royalty free")


def _captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [junk_caption(rng) if i % 5 == 0 else caption(sample_scene(rng), rng) for i in range(n)]


def web_variants(n: int) -> list[str]:
    """n distinct alt-text captions: each labelled web caption with one prefix and one suffix of the lists."""
    base = [json.loads(line)["text"] for line in WEB.open()]
    out = dict.fromkeys(p + b + s for s in SUFFIXES for p in PREFIXES for b in base)
    return list(out)[:n]


def _rate(fn, n: int, repeats: int, before=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def bench_parser(n: int, repeats: int) -> list[tuple[str, int, int, float, float]]:
    import spacy

    from diht_core.cat.parser import cached_tagger, parse_captions
    from diht_core.cat.tagging import MODELS

    full = None
    for name in MODELS:
        try:
            full = spacy.load(name)
            break
        except OSError:
            continue
    synthetic = _captions(n)
    web = web_variants(n)
    rng = np.random.default_rng(1)
    web_repeated = [web[i] for i in rng.integers(0, len(web), n)]
    sets = [("synthetic, with repeats", synthetic), ("synthetic, distinct only", list(dict.fromkeys(synthetic))),
            ("web alt-text variants, distinct", web), ("web alt-text variants, with repeats", web_repeated)]
    parse_captions(synthetic[:200])
    list(full.pipe(synthetic[:200]))
    rows = []
    for label, texts in sets:
        theirs = _rate(lambda: list(full.pipe(texts, batch_size=256)), len(texts), repeats)
        cold = lambda: (cached_tagger.cache_clear(), cached_tagger())  # noqa: E731 - a built tagger, empty table
        ours = _rate(lambda: parse_captions(texts), len(texts), repeats, before=cold)
        tagger = cached_tagger()
        rows.append((label, len(set(texts)), len(texts), theirs, ours, tagger.embedded / max(1, tagger.tokens)))
    from diht_core.cat import tagging

    keep, tagging.CACHE_ROWS = tagging.CACHE_ROWS, 0  # the table emptied at every batch: words never come back
    try:
        ours = _rate(lambda: parse_captions(web), len(web), repeats, before=cold)
        tagger = cached_tagger()
        rows.append(("web distinct, table emptied every batch", len(web), len(web), rows[2][3], ours,
                     tagger.embedded / max(1, tagger.tokens)))
    finally:
        tagging.CACHE_ROWS = keep
    print(f"spaCy: {full.meta['name']} {full.meta['version']}, components {', '.join(full.pipe_names)}")
    return rows


def bench_spotters(n: int) -> list[tuple[str, float]]:
    from diht_core.cat.spotting import RapidOCRSpotter

    rows = []
    rng = np.random.default_rng(1)
    for side in (256, 512):
        imgs = []
        for i in range(n):
            sc = sample_scene(rng)
            sc.painted_text = "red circle" if i % 2 == 0 else None  # half the images carry text
            imgs.append(render(sc, side, rng))
        spot = RapidOCRSpotter()
        spot(imgs[0])
        rows.append((f"RapidOCR (onnxruntime) @ {side}px", _rate(lambda: [spot(im) for im in imgs], n)))
        try:  # no docTR weights can be downloaded here: time its detector (the part that runs on every image)
            from doctr.models import detection, detection_predictor

            det = detection_predictor(detection.db_resnet50(pretrained=False, pretrained_backbone=False),
                                      pretrained=False)
            arrs = [np.asarray(im) for im in imgs[: max(4, n // 5)]]
            det(arrs[:1])
            rows.append((f"docTR db_resnet50 detection only @ {side}px (random weights)",
                         _rate(lambda: [det([a]) for a in arrs], len(arrs))))
        except Exception as err:  # noqa: BLE001
            rows.append((f"docTR @ {side}px: {type(err).__name__}: {err}", float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="each timing is the best of this many runs")
    ap.add_argument("--parser-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"one thread; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = bench_parser(args.captions, args.repeats)
    print(f"{'captions':<38} {'distinct/total':>15} {'spaCy full /s':>14} {'ours /s':>9} {'ours/spaCy':>11}"
          f" {'tokens embedded anew':>21}")
    print("-" * 113)
    for label, distinct, total, theirs, ours, anew in rows:
        print(f"{label:<38} {f'{distinct}/{total}':>15} {theirs:>14.0f} {ours:>9.0f} {ours / theirs:>10.1f}x {anew:>20.0%}")
    print("goal: ours >= 4x spaCy's full pipe on distinct captions")
    if args.parser_only:
        return
    print(f"{'what':<80} {'per core /s':>12}")
    for name, rate in bench_spotters(args.images):
        print(f"{name:<80} {rate:>12.1f}  images")
    print("goal: >= 10 images/s per core at 256 px")


if __name__ == "__main__":
    main()
