"""A streaming webdataset loader for training: shard shuffling, several workers, and the join of
each sample with its two sparse pseudo-label vectors by key."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ..config import PseudoLabelParams, TrainParams
from .images import image_to_uint8
from .planted import scene_id
from .pseudo_labels import SparsePseudoLabels
from .shards import Faults, iter_shard, parse_sample, shard_paths


class _Join:
    """Turns a raw webdataset sample into (key, image uint8, tokens, obj, attr, scene_id), or a skip: {"skip": the parsed
    sample with its fault} (a bad sample, a truncated shard, or a key without pseudo-label under missing="skip")."""

    def __init__(self, image_size: int, tokenizer, max_pixels: int, pseudo: SparsePseudoLabels | None, missing: str,
                 seed: int, captions_per_image: int):
        self.image_size, self.tokenizer, self.pseudo, self.missing = image_size, tokenizer, pseudo, missing
        self.max_pixels, self.k = max_pixels, captions_per_image
        self.rng = np.random.default_rng(seed)

    def __call__(self, raw: dict):
        s = parse_sample(raw, self.max_pixels, need_caption=True)
        if s["fault"] is not None:
            return {"skip": {k: s[k] for k in ("key", "shard", "fault", "read", "error") if k in s}}
        key = s["key"]
        if self.pseudo is not None and key not in self.pseudo:
            if self.missing == "error":
                raise KeyError(f"no pseudo-label for sample key {key!r} (pseudo_labels.missing=error)")
            return {"skip": {"key": key, "fault": "missing_pseudo_label"}}
        image = image_to_uint8(s["pil"], self.image_size)
        captions = s["captions"]
        if self.k == 1:  # several captions: one per visit
            texts = [captions[int(self.rng.integers(len(captions)))]]
        else:  # K of them (cycled when there are fewer), all positives of this image
            order = self.rng.permutation(len(captions))
            texts = [captions[order[j % len(order)]] for j in range(self.k)]
        out = {"skip": None, "key": key, "image": image, "text": self.tokenizer(texts),
               "scene_id": scene_id(s.get("json"))}
        if self.pseudo is not None:
            out["obj"], out["attr"] = self.pseudo.dense(key)
        return out


def _collate(kept: list[dict], faults: Faults) -> dict:
    batch = {"skipped": faults.skipped, "skipped_by_reason": faults.by_reason, "truncated": faults.truncated,
             "key": [s["key"] for s in kept]}
    for name in ("image", "obj", "attr"):
        if kept and name in kept[0]:
            batch[name] = torch.stack([s[name] for s in kept])
    if kept:
        batch["text"] = torch.cat([s["text"] for s in kept])  # K captions per image, image-major
        batch["scene_id"] = torch.tensor([s["scene_id"] for s in kept], dtype=torch.long)
    return batch


def _batch_kept(batch_size: int, partial: bool):
    """Batches of exactly `batch_size` kept samples (a smaller last one when partial), each with the samples skipped
    on its way (``skipped``, ``skipped_by_reason``) and the shards found truncated (``truncated``): a skip never
    shrinks a batch, so every rank's batch has the same size."""
    def stage(src):
        kept, faults = [], Faults()
        for s in src:
            if s["skip"] is not None:
                faults.skip(s["skip"])
                continue
            kept.append(s)
            if len(kept) == batch_size:
                yield _collate(kept, faults)
                kept, faults = [], Faults()
        if (kept and partial) or faults.by_reason or faults.truncated:
            yield _collate(kept if partial else [], faults)
    return stage


def _shard_samples(src):
    """The raw samples of each shard of the stream ({"url": path}), by the one shard reader (data/shards.py)."""
    for shard in src:
        yield from iter_shard(shard["url"])


def make_loader(shard_dir: str | Path, image_size: int, tokenizer, batch_size: int, max_pixels: int, seed: int,
                cfg: TrainParams = TrainParams(), pseudo: SparsePseudoLabels | None = None,
                missing: str = PseudoLabelParams().missing, shuffle_buffer: int = 1000) -> torch.utils.data.DataLoader:
    """One epoch over the shards, a deterministic function of `seed` (and the number of workers and ranks); of the
    train section it reads workers, resample and captions_per_image (batch_size and seed are the caller's: per rank,
    per epoch).

    cfg.resample=False: shard order shuffled by seed, split across ranks and workers, partial last batch.
    cfg.resample=True: an endless stream of shards drawn with replacement (per rank and worker), full batches;
    the caller decides how many batches make an epoch.  Samples are shuffled in a seeded buffer.
    Batches are dicts: key, image (uint8), text (K rows per image), obj, attr, scene_id (int64, the planted truth of
    data/planted.py, NO_SCENE where absent), skipped, skipped_by_reason, truncated.
    A sample with a fault (data/shards.py FAULTS, max_pixels checked in the header) is skipped and counted; one whose
    key has no pseudo-label is an error (missing="error") or is skipped and counted (missing="skip"); the counts
    travel with each batch, so no worker ever hangs on them."""
    urls = [str(p) for p in shard_paths(shard_dir)]
    if not urls:
        raise FileNotFoundError(f"no shards in {shard_dir}")
    if cfg.resample:
        shards = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls), wds.detshuffle(len(urls), seed=seed), wds.split_by_node,
                  wds.split_by_worker]
    ds = wds.DataPipeline(
        *shards,
        _shard_samples,
        wds.shuffle(shuffle_buffer, seed=seed),
        wds.map(_Join(image_size, tokenizer, max_pixels, pseudo, missing, seed, cfg.captions_per_image)),
        _batch_kept(batch_size, partial=not cfg.resample))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                                       persistent_workers=False, worker_init_fn=_seed_worker(seed))


def _seed_worker(seed: int):
    def init(worker_id: int):
        _forget_parent_thread_hooks()
        random.seed(seed * 1000 + worker_id)
        np.random.seed(seed * 1000 + worker_id)
    return init


def _forget_parent_thread_hooks() -> None:
    """A forked worker inherits its parent's thread-exit hooks (``threading._register_atexit``: thread pools,
    Prefect's log and event services when training runs inside a flow). They drain threads that exist only in the
    parent; Prefect's assert at the worker's exit, which ends the worker with exit code 1 after its last batch and
    fails the epoch ("DataLoader worker exited unexpectedly"). The worker starts no such threads: drop the hooks."""
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is not None:
        hooks.clear()
