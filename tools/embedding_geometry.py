"""The embedding geometry of trained models, the diagnostic behind HN-NCE's compositional loss (README,
"Ablation"): per model, on the compositional test (a true caption against the same words with roles or colours
swapped) the text encoder's cosine of the two captions and the image's margin between them; how crowded the space
is (cosine of an image and its caption, of two unrelated captions, of an image and an unrelated caption); the
learned logit scale; and, on batches of the training shards, the share of negatives HN-NCE's gradient pulls
closer (``hn_pulled_negatives``) at that model, the batch's image-to-text top-1 and the logit scale at which
InfoNCE's loss on those batches is lowest (the temperature training would settle at, at this geometry).
Offline, CPU.

    python tools/embedding_geometry.py --data ablation/full/upstream/<digest>/data \\
        ablation/full/runs/cat ablation/full/runs/cat_hn-nce [--beta 0.5] [--out geometry.json]

A run folder holds seed<k>/models/model.pt (an ablation arm) or models/model.pt; each seed is measured, and the
table gives each arm's mean over its seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from diht_core.config import DownloadParams, TrainParams
from diht_core.data.eval_datasets import load_synthetic
from diht_core.data.shards import Faults
from diht_core.eval.encoders import encode_images, encode_statements, text_encoder
from diht_core.eval.registry import get_task
from diht_core.models import create_model, image_size
from diht_core.train import load_train_set
from diht_core.train.mechanisms import hn_pulled_negatives

COLUMNS = ("logit_scale", "cos_image_caption", "cos_caption_caption", "cos_image_other_caption",
           "role_swap_accuracy", "role_swap_cos", "role_swap_margin", "colour_swap_accuracy", "colour_swap_cos",
           "colour_swap_margin", "hn_pulled_share", "hn_pull_to_push", "batch_top1", "best_logit_scale")


def swap_geometry(img: torch.Tensor, true: torch.Tensor, wrong: torch.Tensor, qtypes: list[str]) -> dict:
    """Unit-norm embeddings of the compositional items' images, true and swapped captions: per swap kind the
    accuracy (image closer to the true caption), the two captions' cosine and the mean margin; the cosine of an
    image and its caption, of two items' true captions, and of an image and another item's caption."""
    other = torch.roll(torch.arange(len(img)), 1)
    margin = (img * true).sum(-1) - (img * wrong).sum(-1)
    out = {"cos_image_caption": float((img * true).sum(-1).mean()),
           "cos_caption_caption": float((true * true[other]).sum(-1).mean()),
           "cos_image_other_caption": float((img * true[other]).sum(-1).mean())}
    for kind in sorted(set(qtypes)):
        m = torch.tensor([q == kind for q in qtypes])
        out.update({f"{kind}_accuracy": float((margin[m] > 0).float().mean()),
                    f"{kind}_cos": float((true[m] * wrong[m]).sum(-1).mean()), f"{kind}_margin": float(margin[m].mean())})
    return out


SCALES = torch.logspace(0, 2, 201)  # 1 ... 100 (CLIP's clamp)


def best_logit_scale(sims: list[torch.Tensor]) -> float:
    """The scale on SCALES at which the mean symmetric InfoNCE loss of these batches' cosine matrices is lowest (in
    float64; where the loss is flat to that precision, the larger scale)."""
    sims = [m.double() for m in sims]

    def loss(s):
        return statistics.fmean(
            0.5 * float(torch.nn.functional.cross_entropy(s * m, torch.arange(len(m)))
                        + torch.nn.functional.cross_entropy(s * m.T, torch.arange(len(m)))) for m in sims)
    return float(min(reversed(SCALES.double()), key=loss))


def pulled(model, data, beta: float, batch_size: int, batches: int) -> dict:
    """hn_pulled_negatives at the model's logit scale on the first ``batches`` batches of the training set in file
    order (each image with its first caption), averaged; the batches' top-1 and best_logit_scale."""
    if len(data) < batch_size:
        raise SystemExit(f"the training set has {len(data)} images, fewer than a batch of {batch_size}: --batch-size")
    rows, sims = [], []
    for b in range(min(batches, len(data) // batch_size)):
        idx = list(range(b * batch_size, (b + 1) * batch_size))
        with torch.no_grad():
            img = encode_images(model, data.images[idx])  # unit norm
            tok = data.tokens[[data.caption_index[i][0] for i in idx]]
            txt = torch.nn.functional.normalize(model.encode_text(tok).float(), dim=-1)
        sims.append(img @ txt.T)
        rows.append(hn_pulled_negatives(model.logit_scale.detach().exp().float() * sims[-1], beta))
    return {"hn_pulled_share": statistics.fmean(r["share"] for r in rows),
            "hn_pull_to_push": statistics.fmean(r["pull_to_push"] for r in rows),
            "batch_top1": statistics.fmean(float((m.argmax(1) == torch.arange(len(m))).float().mean()) for m in sims),
            "best_logit_scale": best_logit_scale(sims)}


def models_of(run: Path) -> list[Path]:
    found = sorted(run.glob("seed*/models/model.pt")) or sorted(run.glob("models/model.pt"))
    if not found:
        raise SystemExit(f"{run}: no seed<k>/models/model.pt or models/model.pt")
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (an ablation arm's, or a models/ parent)")
    parser.add_argument("--data", required=True, type=Path,
                        help="the upstream data folder: eval/synthetic_compositional and filtered/ in it")
    parser.add_argument("--model-name", default=TrainParams().model, help="the models' open_clip config")
    parser.add_argument("--beta", type=float, default=TrainParams().hn_beta, help="HN-NCE's beta for the pull")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8, help="training batches the pull is averaged over")
    parser.add_argument("--out", type=Path, help="write every model's numbers as JSON here")
    args = parser.parse_args(argv)
    task = get_task("synthetic_compositional")
    comp = train = None
    per_model: dict[str, dict] = {}
    for run in args.runs:
        for path in models_of(run):
            model, _, tokenizer = create_model(args.model_name, pretrained=str(path))
            model.eval()
            if comp is None:
                comp = load_synthetic(task.path(args.data), task.kind, image_size(model), faults=Faults())
                train = load_train_set(args.data / "filtered", image_size(model), tokenizer,
                                       DownloadParams().url_list.max_pixels)
            encode = text_encoder(model, tokenizer)
            img = encode_images(model, comp["images"])
            labels, items = torch.as_tensor(comp["labels"]), torch.arange(len(comp["labels"]))
            statements = encode_statements(encode, comp["statements"])  # [items, 2, d]: true and swapped
            true, wrong = statements[items, labels], statements[items, 1 - labels]
            per_model[str(path)] = {"run": str(run), "logit_scale": float(model.logit_scale.detach().exp()),
                                    **swap_geometry(img, true, wrong, comp["qtypes"]),
                                    **pulled(model, train, args.beta, args.batch_size, args.batches)}
            print(f"{path}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_model[str(path)].items() if k != "run"),
                  flush=True)
    print(f"\nmean over each run's models (HN-NCE's pull at beta {args.beta})\n")
    print("| run | models | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for run in args.runs:
        rows = [m for m in per_model.values() if m["run"] == str(run)]
        print(f"| {run.name} | {len(rows)} | " + " | ".join(
            f"{statistics.fmean(r[c] for r in rows):.3f}" if all(c in r for r in rows) else "–" for c in COLUMNS)
            + " |")
    if args.out:
        args.out.write_text(json.dumps(per_model, indent=1))


if __name__ == "__main__":
    main()
