"""FFF's mining thresholds against the planted truth: precision and recall of its image-image and text-text rules
on a trained model's embeddings of the synthetic training set, per threshold (the cosines at which the mined
pairs are mostly true). Offline, CPU; a diagnostic of the ablation (README, "Ablation").

    python tools/fff_thresholds.py --model ablation/full/runs/sigmoid-2caps/seed0/models/model.pt \\
        --shards ablation/full/upstream/<digest>/data/filtered [--out fff_thresholds.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diht_core.config import DownloadParams, TrainParams
from diht_core.eval.encoders import encode_images
from diht_core.models import create_model, image_size
from diht_core.train import load_train_set
from diht_core.train.mechanisms import threshold_curve

THRESHOLDS = [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model.pt")
    parser.add_argument("--model-name", default=TrainParams().model, help="its open_clip config")
    parser.add_argument("--shards", required=True, help="the training shards (CAT-filtered) with planted truth")
    parser.add_argument("--batch-size", type=int, default=128, help="the batch the per-batch counts are of")
    parser.add_argument("--out", help="write the curves as JSON here")
    args = parser.parse_args(argv)
    model, _, tokenizer = create_model(args.model_name, pretrained=args.model)
    model.eval()
    data = load_train_set(args.shards, image_size(model), tokenizer, DownloadParams().url_list.max_pixels)
    if data.scene_ids is None:
        raise SystemExit(f"{args.shards}: no planted scene ids (only the synthetic data carry them)")
    images = encode_images(model, data.images)
    tokens = data.tokens[[rows[0] for rows in data.caption_index]]  # each image's first caption
    with torch.no_grad():
        texts = F.normalize(torch.cat([model.encode_text(tokens[i:i + 256]) for i in range(0, len(tokens), 256)])
                            .float(), dim=-1)
    curves = {rule: threshold_curve(f, data.scene_ids, THRESHOLDS, args.batch_size)
              for rule, f in (("image-image", images), ("text-text", texts))}
    print(f"{len(data)} images; pairs judged by planted scene id; per batch of {args.batch_size}")
    print("| rule | threshold | precision | recall | mined pairs a batch | true pairs a batch |")
    print("|---|---|---|---|---|---|")
    for rule, rows in curves.items():
        for r in rows:
            p, rc = ("–" if r[k] is None else f"{r[k]:.3f}" for k in ("precision", "recall"))
            print(f"| {rule} | {r['threshold']} | {p} | {rc} | {r['mined_pairs_per_batch']:.1f} "
                  f"| {r['true_pairs_per_batch']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "shards": args.shards, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
