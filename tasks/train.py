"""Stage `train`: a small open_clip model trained with InfoNCE (+ concept distillation when enabled)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import torch

from diht_core import pseudo_labels as PL
from diht_core.models import ConceptHeads, create_model, image_size
from diht_core.data.loader import SparsePseudoLabels, make_loader
from diht_core.data.shards import shard_paths
from diht_core.train import StreamingData, TrainConfig, load_train_set, train

from ._registry import register_trained_model
from ._stage import STATE_DIR, cli, make_task, pyplot, save_figure


def body(p, run) -> dict:
    tp = p.train
    data, models = Path(p.paths.data), Path(p.paths.models)
    cfg = TrainConfig(model=tp.model, steps=tp.steps, batch_size=tp.batch_size, lr=tp.lr,
                      weight_decay=tp.weight_decay, warmup_steps=tp.warmup_steps, loss=tp.loss,
                      lambda_obj=tp.lambda_obj, lambda_attr=tp.lambda_attr, checkpoint_every=tp.checkpoint_every,
                      log_every=tp.log_every, seed=p.seed, hn_alpha=tp.hn_alpha, hn_beta=tp.hn_beta,
                      fff_it_threshold=tp.fff_it_threshold, fff_tt_threshold=tp.fff_tt_threshold,
                      fff_ii_threshold=tp.fff_ii_threshold, precision=tp.precision,
                      grad_checkpointing=tp.grad_checkpointing, accum_steps=tp.accum_steps)
    # the sigmoid loss starts where open_clip's SigLIP does: scale ln(10), bias -10
    sig = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if tp.loss == "sigmoid" else {}
    model, _, tokenizer = create_model(tp.model, **sig)
    distill = tp.lambda_obj > 0 or tp.lambda_attr > 0
    pseudo = None
    sizes = json.loads((data / "pseudo_labels" / "vocab_sizes.json").read_text())
    heads = ConceptHeads(model.visual.output_dim, sizes["objects"], sizes["attributes"])
    if tp.loader == "webdataset":
        trainset = _streaming(p, data, image_size(model), tokenizer, sizes if distill else None)
    else:
        if distill:
            pseudo = PL.load_all(data / "pseudo_labels", sizes["objects"], sizes["attributes"])
        trainset = load_train_set(data / "filtered", image_size(model), tokenizer, pseudo, p.pseudo_labels.missing)
    summary = train(model, trainset, cfg, STATE_DIR / "checkpoints" / "train",
                    log_fn=run.log_step, heads=heads)
    models.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), models / "model.pt")  # a plain open_clip state dict
    torch.save(heads.state_dict(), models / "heads.pt")
    plots = Path(p.paths.plots)
    plots.mkdir(parents=True, exist_ok=True)
    hist = pd.DataFrame(summary["history"])
    hist.drop(columns=["samples_per_s"]).to_csv(plots / "train_loss.csv", index=False)
    _loss_png(hist, plots / "train_loss.png")
    run.log_artifact(plots / "train_loss.png", "plots")
    register_trained_model(p, models)  # a new version of the registered model diht-<train.model> (tasks/_registry.py)
    return {
        "model": tp.model,
        "loader": tp.loader,
        "train_pairs": len(trainset) if tp.loader == "memory" else None,
        "train_captions": int(trainset.tokens.shape[0]) if tp.loader == "memory" else None,
        "skipped_samples": trainset.skipped,
        "samples_seen": tp.steps * tp.batch_size,
        "distillation": distill,
        "final_loss": summary["final_loss"],
        "final_logit_scale": float(model.logit_scale.exp()),
    }


def _streaming(p, data: Path, size: int, tokenizer, sizes: dict | None) -> StreamingData:
    """Shards streamed by the webdataset loader, pseudo-labels joined by key in the workers."""
    pseudo = SparsePseudoLabels(data / "pseudo_labels", sizes["objects"], sizes["attributes"]) if sizes else None
    h = hashlib.sha256()
    files = shard_paths(data / "filtered") + (sorted((data / "pseudo_labels").glob("*.npz")) if sizes else [])
    for f in files:
        h.update(f.read_bytes())

    def loader(seed: int):
        return make_loader(data / "filtered", size, tokenizer, p.train.batch_size, p.train.workers, pseudo,
                           p.pseudo_labels.missing, seed)

    return StreamingData(loader, h.hexdigest()[:16], distill=sizes is not None)


def _loss_png(hist: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(hist.step, hist.loss, label="total")
    ax.plot(hist.step, hist.loss_contrastive, label="contrastive")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    save_figure(fig, path)


train_task = make_task("train", body)

if __name__ == "__main__":
    cli("train", body)
