"""One training run from the params: build the model, heads and data, train, save the outputs (rank 0); or the
same on torchrun ranks (launched by diht_core/launch.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ..config import Params, TrainParams
from ..data.files import atomic_path, atomic_torch_save
from ..models import ConceptHeads, create_model, image_size
from ..models.open_clip_dir import write_open_clip_dir
from ..plots import pyplot, save_figure
from .checkpoint import clear_checkpoints, refuse_nan
from .data import training_data, vocab_sizes
from .distributed import destroy, full_model_state, init_distributed
from .loop import train
from .mechanisms import PREFIX, mechanisms_block


def init_kwargs(cfg: TrainParams) -> dict:
    """open_clip's create_model kwargs for the logit scale (and bias) training starts from: the sigmoid loss where
    open_clip's SigLIP does (scale 10, bias train.sigmoid_bias_init), the others at the model's own 1/0.07;
    train.logit_scale_init, when set, overrides the scale."""
    out = {"init_logit_scale": math.log(10), "init_logit_bias": cfg.sigmoid_bias_init} if cfg.loss == "sigmoid" else {}
    if cfg.logit_scale_init is not None:
        out["init_logit_scale"] = math.log(cfg.logit_scale_init)
    return out


def initial_model(cfg: TrainParams):
    """(model, tokenizer) training starts from: a fresh init (init_kwargs), or train.init_from's weights with its
    scale replaced by train.logit_scale_init when that is set, and for the sigmoid loss from a file without a bias
    (an InfoNCE model) the bias at train.sigmoid_bias_init (create_model's init_logit_bias)."""
    pretrained = None
    if cfg.init_from is not None:
        pretrained = Path(cfg.init_from.replace("{seed}", str(cfg.seed)))
        if not pretrained.exists():
            raise FileNotFoundError(f"train.init_from: {pretrained} not found (a model file, such as another run's "
                                    "models/model.pt)")
    model, _, tokenizer = create_model(cfg.model, pretrained=None if pretrained is None else str(pretrained),
                                       **init_kwargs(cfg))
    if pretrained is not None and cfg.logit_scale_init is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.logit_scale_init))
    return model, tokenizer


def fit(p: Params, checkpoint_dir: Path, log_fn: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the params say (on every rank under torchrun); rank 0 writes models/model.pt (a plain open_clip
    state dict), the same model in open_clip's local-dir layout beside it, models/heads.pt and the loss curve, and
    returns the stage's metrics ({} on other ranks), with ``mechanisms`` (train/mechanisms.py) when the data carry
    planted truth."""
    cfg = p.resolved_train()
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # train.seed: the model's init too
    model, tokenizer = initial_model(cfg)
    distill = cfg.lambda_obj > 0 or cfg.lambda_attr > 0
    sizes = vocab_sizes(p.paths)
    heads = ConceptHeads(model.visual.output_dim, sizes["objects"], sizes["attributes"])
    trainset = training_data(p, image_size(model), tokenizer, sizes if distill else None)
    summary = train(model, trainset, cfg, checkpoint_dir, log_fn=log_fn, heads=heads, dist=info,
                    keep_checkpoints=True)
    state = full_model_state(model, cfg.strategy, info)
    destroy(info)
    if not info.is_main:
        return {}
    head_state = {k: v.cpu() for k, v in heads.state_dict().items()}
    refuse_nan(state, "models/model.pt")
    refuse_nan(head_state, "models/heads.pt")
    models = Path(p.paths.models)
    atomic_torch_save(state, models / "model.pt")  # the outputs first, then the checkpoints go
    atomic_torch_save(head_state, models / "heads.pt")
    write_open_clip_dir(state, cfg.model, models)  # open_clip.create_model_and_transforms('local-dir:models')
    plots = Path(p.paths.plots)
    hist = pd.DataFrame(summary["history"])
    with atomic_path(plots / "train_loss.csv") as tmp:
        hist.drop(columns=["samples_per_s", *(c for c in hist if c.startswith(PREFIX))]).to_csv(tmp, index=False)
    loss_plot(hist, plots / "train_loss.png")
    clear_checkpoints(summary["checkpoint_dir"])
    in_memory = cfg.loader == "memory"
    mechanisms = mechanisms_block(summary["history"])  # against the planted truth: none without it
    return {
        **({"mechanisms": mechanisms} if mechanisms else {}),
        "model": cfg.model,
        "source": cfg.source,
        "seed": cfg.seed,
        "loader": cfg.loader,
        "world_size": info.world_size,
        "device": info.device.type,
        "train_pairs": len(trainset) if in_memory else None,
        "train_captions": int(trainset.tokens.shape[0]) if in_memory else None,
        "skipped_samples": trainset.skipped,
        "skipped_by_reason": trainset.faults.by_reason,
        "truncated_shards": trainset.faults.truncated,
        "samples_seen": cfg.steps * cfg.batch_size,
        "distillation": distill,
        "final_loss": summary["final_loss"],
        "final_logit_scale": float(state["logit_scale"].exp()),
    }


def loss_plot(hist: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(hist.step, hist.loss, label="total")
    ax.plot(hist.step, hist.loss_contrastive, label="contrastive")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    save_figure(fig, path)
