"""Stage `train`: an open_clip model trained with InfoNCE, HN-NCE or FFF's sigmoid loss (+ concept distillation),
in this process or on torchrun ranks (`train.launcher`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from diht_core.data import pseudo_labels as PL
from diht_core.models import ConceptHeads, create_model, image_size
from diht_core.data.loader import SparsePseudoLabels, make_loader
from diht_core.data.shards import shard_paths
from diht_core.distributed import destroy, full_model_state, init_distributed, launched_by_torchrun
from diht_core.config import load_params
from diht_core.train import StreamingData, TrainConfig, load_train_set, train

from ._registry import register_trained_model
from diht_core.plots import pyplot, save_figure

from ._stage import STATE_DIR, cli, make_task, mlflow_names, run_stage, seed_everything, set_env

RUN_ENV = "DIHT_MLFLOW_RUN_ID"  # the stage's MLflow run, which rank 0 of a torchrun launch logs into


def body(p, run) -> dict:
    if p.train.launcher == "torchrun" and not launched_by_torchrun():
        metrics = _launch_torchrun(p, run)
    else:
        metrics = fit(p, run.log_step, run)
    register_trained_model(p, Path(p.paths.models))  # a new version of diht-<train.model> (tasks/_registry.py)
    return metrics


def fit(p, log_fn=None, run=None) -> dict:
    """Build the model and data, train (on every rank under torchrun), save on rank 0; the stage's metrics."""
    tp = p.train
    info = init_distributed(tp.device)
    data, models = Path(p.paths.data), Path(p.paths.models)
    cfg = TrainConfig(model=tp.model, steps=tp.steps, batch_size=tp.batch_size, lr=tp.lr,
                      weight_decay=tp.weight_decay, warmup_steps=tp.warmup_steps, loss=tp.loss,
                      lambda_obj=tp.lambda_obj, lambda_attr=tp.lambda_attr, checkpoint_every=tp.checkpoint_every,
                      log_every=tp.log_every, seed=p.seed if tp.seed is None else tp.seed, hn_alpha=tp.hn_alpha, hn_beta=tp.hn_beta,
                      fff_it_threshold=tp.fff_it_threshold, fff_tt_threshold=tp.fff_tt_threshold,
                      fff_ii_threshold=tp.fff_ii_threshold, fff_mining_start=tp.fff_mining_start,
                      precision=tp.precision,
                      grad_checkpointing=tp.grad_checkpointing, accum_steps=tp.accum_steps,
                      captions_per_image=tp.captions_per_image, compile=tp.compile, strategy=tp.strategy)
    # the sigmoid loss starts where open_clip's SigLIP does: scale ln(10), bias -10 (train.sigmoid_bias_init)
    sig = {"init_logit_scale": math.log(10), "init_logit_bias": tp.sigmoid_bias_init} if tp.loss == "sigmoid" else {}
    torch.manual_seed(cfg.seed)  # train.seed: the model's init too
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
        trainset = load_train_set(shard_dir(p), image_size(model), tokenizer, pseudo, p.pseudo_labels.missing)
    summary = train(model, trainset, cfg, STATE_DIR / "checkpoints" / "train", log_fn=log_fn, heads=heads, dist=info)
    state = full_model_state(model, tp.strategy, info)
    destroy(info)
    if not info.is_main:
        return {}
    models.mkdir(parents=True, exist_ok=True)
    torch.save(state, models / "model.pt")  # a plain open_clip state dict
    torch.save({k: v.cpu() for k, v in heads.state_dict().items()}, models / "heads.pt")
    plots = Path(p.paths.plots)
    plots.mkdir(parents=True, exist_ok=True)
    hist = pd.DataFrame(summary["history"])
    hist.drop(columns=["samples_per_s"]).to_csv(plots / "train_loss.csv", index=False)
    _loss_png(hist, plots / "train_loss.png")
    if run is not None:
        run.log_artifact(plots / "train_loss.png", "plots")
    return {
        "model": tp.model,
        "source": tp.source,
        "seed": cfg.seed,
        "loader": tp.loader,
        "world_size": info.world_size,
        "device": info.device.type,
        "train_pairs": len(trainset) if tp.loader == "memory" else None,
        "train_captions": int(trainset.tokens.shape[0]) if tp.loader == "memory" else None,
        "skipped_samples": trainset.skipped,
        "samples_seen": tp.steps * tp.batch_size,
        "distillation": distill,
        "final_loss": summary["final_loss"],
        "final_logit_scale": float(state["logit_scale"].exp()),
    }


def shard_dir(p) -> Path:
    """The training shards: the CAT-filtered ones, or the raw ones (train.source: raw, no CAT filter)."""
    return Path(p.paths.data) / ("raw/train" if p.train.source == "raw" else "filtered")


def _launch_torchrun(p, run) -> dict:
    """`torchrun --standalone --nproc-per-node N -m tasks.train`: the ranks train, rank 0 logs to this stage's
    MLflow run and hands its metrics back through a file."""
    import mlflow

    work = STATE_DIR / "torchrun"
    work.mkdir(parents=True, exist_ok=True)
    params_file, result = work / "params.yaml", work / "result.json"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
    result.unlink(missing_ok=True)
    project = str(Path(__file__).resolve().parents[1])  # where tasks/ and diht_core/ are
    env = {**os.environ, RUN_ENV: mlflow.active_run().info.run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p.train.nproc_per_node}",
           "-m", "tasks.train", "--params", str(params_file), "--result", str(result)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"torchrun training failed (exit code {proc.returncode}; the ranks' errors are above); "
                           f"command: {' '.join(cmd)}")
    run.log_artifact(Path(p.paths.plots) / "train_loss.png", "plots")
    return json.loads(result.read_text())


def _mlflow_logger(run_id: str):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()

    def log(step: int, rec: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in mlflow_names(rec).items()])
    return log


def _count_samples(shard_dir: Path) -> int:
    keys = set()
    for path in shard_paths(shard_dir):
        with tarfile.open(path) as tar:
            keys.update((path, name.split(".", 1)[0]) for name in tar.getnames())
    return len(keys)


def _streaming(p, data: Path, size: int, tokenizer, sizes: dict | None) -> StreamingData:
    """Shards streamed by the webdataset loader, pseudo-labels joined by key in the workers."""
    tp = p.train
    pseudo = SparsePseudoLabels(data / "pseudo_labels", sizes["objects"], sizes["attributes"]) if sizes else None
    h = hashlib.sha256()
    files = shard_paths(shard_dir(p)) + (sorted((data / "pseudo_labels").glob("*.npz")) if sizes else [])
    for f in files:
        h.update(f.read_bytes())
    # the stream also depends on these: a resume under other ones must not reuse the position
    h.update(json.dumps([tp.resample, tp.workers, os.environ.get("WORLD_SIZE", "1")]).encode())

    def loader(seed: int, batch_size: int):
        return make_loader(shard_dir(p), size, tokenizer, batch_size, tp.workers, pseudo,
                           p.pseudo_labels.missing, seed, resample=tp.resample,
                           captions_per_image=tp.captions_per_image)

    epoch_steps = math.ceil(_count_samples(shard_dir(p)) / tp.batch_size) if tp.resample else None
    return StreamingData(loader, h.hexdigest()[:16], distill=sizes is not None, epoch_steps=epoch_steps)


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


def main() -> None:
    """`python -m tasks.train --params params.yaml`, also under torchrun (every rank runs it; rank 0 owns the
    MLflow run and the outputs). `--result` is how `train.launcher: torchrun` gets rank 0's metrics back."""
    if not launched_by_torchrun():
        return cli("train", body)
    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    set_env()
    p = load_params(args.params)
    seed_everything(p.seed)
    rank = int(os.environ["RANK"])
    if args.result is None and rank == 0:  # torchrun launched by hand (multi-node): rank 0 runs the stage
        run_stage("train", body, p)
        return
    log_fn = _mlflow_logger(os.environ[RUN_ENV]) if rank == 0 and os.environ.get(RUN_ENV) else None
    metrics = fit(p, log_fn)
    if rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
