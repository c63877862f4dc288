"""Training data: the in-memory set (decoded once) and the streaming one (webdataset), both a pure function of
(seed, step), so a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import Params, Paths, PseudoLabelParams, TrainParams
from ..data.images import read_decoded, to_device
from ..data.loader import make_loader
from ..data.planted import NO_SCENE, planted_noise, scene_id, swap_family
from ..data.pseudo_labels import SparsePseudoLabels, load_all
from ..data.recaption import input_dir, output_dir
from ..data.shards import Faults, count_samples, shard_paths


@dataclass
class TrainSet:
    keys: list[str]
    images: torch.Tensor            # uint8 [N, 3, H, W]
    tokens: torch.Tensor            # int64 [T, ctx], all captions
    caption_index: list[list[int]]  # per image, rows of `tokens`
    obj_targets: torch.Tensor | None = None   # float [N, V_obj] (dense from sparse top-k)
    attr_targets: torch.Tensor | None = None
    scene_ids: torch.Tensor | None = None     # int64 [N], planted truth (data/planted.py): NO_SCENE where absent
    family_ids: torch.Tensor | None = None    # int64 [N], planted swap families (hard negatives): NO_SCENE where none
    faults: Faults = field(default_factory=Faults)  # skipped samples by reason, truncated shards

    @property
    def skipped(self) -> int:
        return self.faults.skipped

    def __len__(self):
        return len(self.keys)

    def batches(self, cfg: TrainParams, start: int, rank: int = 0, world_size: int = 1, position=None):
        """This rank's share of the batch of every global step from `start` on: a pure function of
        (seed, step). With K = cfg.captions_per_image the texts are K captions per image, image-major; with
        ``scene_id`` and ``family_id`` (int64, NO_SCENE where absent) when the data carry the planted truth."""
        k = cfg.captions_per_image
        scene_order = None
        if cfg.batch_sampler == "distinct_scenes":
            if self.scene_ids is None:
                raise ValueError("train.batch_sampler: distinct_scenes needs the planted scene ids of the synthetic "
                                 "data; these shards carry none")
            scene_order = DistinctSceneOrder(self.scene_ids.tolist(), cfg.batch_size, cfg.seed)
        elif cfg.batch_sampler == "swap_families":
            if self.family_ids is None:
                raise ValueError("train.batch_sampler: swap_families needs the planted scenes of the synthetic data; "
                                 "these shards carry none")
            scene_order = SwapFamilyOrder(self.family_ids.tolist(), self.scene_ids.tolist(), cfg.seed)
        for step in range(start, cfg.steps):
            full = batch_indices(step, len(self), cfg.batch_size, cfg.seed, scene_order)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            rows = []
            for i in full.tolist():
                caps = self.caption_index[i]
                order = torch.randperm(len(caps), generator=g).tolist() if k > 1 else \
                    [int(torch.randint(len(caps), (1,), generator=g))]
                rows.append([caps[order[j % len(order)]] for j in range(k)])  # fewer captions: cycle them
            idx, rows = full.chunk(world_size)[rank], list(_chunks(rows, world_size))[rank]
            rows = torch.tensor([r for row in rows for r in row])
            batch = {"image": self.images[to_device(idx, self.images.device)],
                     "text": self.tokens[to_device(rows, self.tokens.device)]}
            if self.obj_targets is not None:
                batch["obj"], batch["attr"] = self.obj_targets[idx], self.attr_targets[idx]
            if self.scene_ids is not None:
                batch["scene_id"] = self.scene_ids[idx]
            if self.family_ids is not None:
                batch["family_id"] = self.family_ids[idx]
            yield batch

    def digest(self) -> str:
        """Fingerprint of the training data (images, captions, pseudo-labels), for safe resumes."""
        h = hashlib.sha256("\n".join(self.keys).encode())
        for t in (self.images, self.tokens, self.obj_targets, self.attr_targets):
            if t is not None:
                h.update(t.contiguous().cpu().numpy().tobytes())
        h.update(json.dumps(self.caption_index).encode())
        return h.hexdigest()[:16]


def _chunks(items: list, parts: int):
    """Split like torch.chunk: equal parts of ceil(n / parts)."""
    size = -(-len(items) // parts)
    return (items[i:i + size] for i in range(0, len(items), size))


def load_train_set(shard_dir: str | Path, image_size: int, tokenizer, max_pixels: int,
                   pseudo_labels: dict | None = None, missing: str = PseudoLabelParams().missing,
                   drop_planted: tuple[str, ...] = ()) -> TrainSet:
    """Decode the (filtered) shards once into memory and join pseudo-labels by key. A sample with a fault (see
    data/shards.py FAULTS) or, with missing="skip", without a pseudo-label is skipped and counted by reason; one of
    a planted noise kind in ``drop_planted`` (an oracle filter, train.drop_planted) as ``oracle_<kind>``."""
    keys, images, caps, index, scenes, families = [], [], [], [], [], []
    pl_rows = []  # row of each kept sample in the pseudo-label arrays
    faults = Faults()
    paths = shard_paths(shard_dir)
    if not paths:
        raise FileNotFoundError(f"no shards in {shard_dir}")
    for s in read_decoded(paths, image_size, max_pixels, need_caption=True):
        if faults.skip(s):
            continue
        key = s["key"]
        if drop_planted:
            kind = planted_noise(s.get("json"))
            if kind is None:
                raise ValueError(f"train.drop_planted: sample {key!r} in {shard_dir} carries no planted noise kind "
                                 "(only the synthetic data do)")
            if kind in drop_planted:
                faults.count(f"oracle_{kind}")
                continue
        if pseudo_labels is not None and key not in pseudo_labels["index"]:
            if missing == "error":
                raise KeyError(f"no pseudo-label for sample key {key!r} (pseudo_labels.missing=error)")
            faults.count("missing_pseudo_label")
            continue
        captions = s["captions"]
        keys.append(key)
        scenes.append(scene_id(s.get("json")))
        families.append(swap_family(s.get("json")))
        images.append(s["image"])
        index.append(list(range(len(caps), len(caps) + len(captions))))  # all of them, as the streamed loader
        caps.extend(captions)
        if pseudo_labels is not None:
            pl_rows.append(pseudo_labels["index"][key])
    if not keys:
        raise ValueError(f"no training sample left in {shard_dir}: {faults.summary()}")
    tokens = tokenizer(caps)
    ts = TrainSet(keys, torch.stack(images), tokens, index, faults=faults)
    if any(sid != NO_SCENE for sid in scenes):  # the planted scene ids, for the mechanism measurements only
        ts.scene_ids = torch.tensor(scenes, dtype=torch.long)
        number = {f: i for i, f in enumerate(dict.fromkeys(f for f in families if f is not None))}
        ts.family_ids = torch.tensor([NO_SCENE if f is None else number[f] for f in families], dtype=torch.long)
    if pseudo_labels is not None:
        rows = torch.tensor(pl_rows, dtype=torch.long)
        ts.obj_targets = pseudo_labels["objects"][rows]
        ts.attr_targets = pseudo_labels["attributes"][rows]
    return ts


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(step: int, n: int, batch_size: int, seed: int, order=None) -> torch.Tensor:
    """Indices of the batch at a global step: epoch-wise permutations seeded by (seed, epoch), or ``order(epoch)``
    (a ``DistinctSceneOrder``)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        take = min(batch_size - len(out), n - offset)
        if order is None:
            out.extend(epoch_permutation(n, seed, epoch)[offset:offset + take].tolist())
        else:
            out.extend(order(epoch)[offset:offset + take])
    return torch.tensor(out)


class DistinctSceneOrder:
    """train.batch_sampler: distinct_scenes. Each epoch's permutation reordered so that no batch holds two images
    of one planted scene description (FFF's control: no false negatives in a batch). Every image still comes once
    an epoch; one whose scene is already in the batch waits for the next batch. The batches are the global
    positions step * batch_size, so a batch across two epochs counts the previous epoch's tail. A pure function of
    (seed, epoch); ``clashes``: batches' repeats that could not be avoided (the epoch's last images)."""

    def __init__(self, scene_ids: list[int], batch_size: int, seed: int):
        if len(scene_ids) < batch_size:
            raise ValueError(f"train.batch_sampler: distinct_scenes needs at least a batch of images "
                             f"({len(scene_ids)} < batch_size {batch_size})")
        self.scenes, self.batch_size, self.seed = scene_ids, batch_size, seed
        self.orders: list[list[int]] = []
        self.clashes = 0

    def __call__(self, epoch: int) -> list[int]:
        n = len(self.scenes)
        while len(self.orders) <= epoch:
            e = len(self.orders)
            fill = e * n % self.batch_size  # positions of the first batch taken by the previous epoch's tail
            tail = self.orders[-1][n - fill:] if fill else []
            self.orders.append(self._reorder(epoch_permutation(n, self.seed, e).tolist(), tail))
        return self.orders[epoch]

    def _reorder(self, perm: list[int], tail: list[int]) -> list[int]:
        out, waiting, stream = [], [], iter(perm)
        batch = {self.scenes[i] for i in tail} - {NO_SCENE}
        fill = len(tail)

        def fits(i: int) -> bool:
            return self.scenes[i] == NO_SCENE or self.scenes[i] not in batch

        while len(out) < len(perm):
            pick = next((j for j, i in enumerate(waiting) if fits(i)), None)
            if pick is not None:
                i = waiting.pop(pick)
            else:
                i = next(stream, None)
                while i is not None and not fits(i):
                    waiting.append(i)
                    i = next(stream, None)
                if i is None:  # nothing left fits this batch
                    i = waiting.pop(0)
                    self.clashes += 1
            out.append(i)
            batch.add(self.scenes[i])
            fill += 1
            if fill == self.batch_size:
                batch, fill = set(), 0
        return out


class SwapFamilyOrder:
    """train.batch_sampler: swap_families (HN-NCE's premise: the hard negatives are in the batch). Each epoch's
    permutation regrouped so that the images of one planted swap family (``swap_family``: the same words with roles
    or colours swapped) come one after another, the families (and the images without one, each alone) in a random
    order of their own (seeded by (seed, epoch)), so that families are spread evenly over the epoch. A batch then
    holds whole families, as a batch of tens of thousands of web pairs holds near-duplicates. (Ordering the groups by
    their first image instead puts the families, whose first image is the earliest of several, at the epoch's start
    and leaves its last batches with almost none: 250 hard pairs in the demo's first batch, 2 in its last.) A
    family's second image of one scene description (a false negative, FFF's premise, not HN-NCE's) is not grouped:
    it stays alone at its own place. Every image once an epoch; a pure function of (seed, epoch)."""

    def __init__(self, family_ids: list[int], scene_ids: list[int], seed: int):
        if all(f == NO_SCENE for f in family_ids):
            raise ValueError("train.batch_sampler: swap_families found no image in a swap family (two related "
                             "shapes): nothing to group")
        self.families, self.scenes, self.seed = family_ids, scene_ids, seed
        self.orders: dict[int, list[int]] = {}

    def __call__(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            groups: dict[tuple, list[int]] = {}
            seen = set()
            for i in epoch_permutation(len(self.families), self.seed, epoch).tolist():
                f, sid = self.families[i], self.scenes[i]
                repeat = sid != NO_SCENE and (f, sid) in seen
                seen.add((f, sid))
                groups.setdefault(("alone", i) if f == NO_SCENE or repeat else ("family", f), []).append(i)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_777_777)  # not the images' permutation
            grouped = list(groups.values())
            shuffled = [grouped[k] for k in torch.randperm(len(grouped), generator=g).tolist()]
            self.orders = {epoch: [i for grp in shuffled for i in grp]}  # one epoch kept: the steps go on
        return self.orders[epoch]


class StreamingData:
    """Training batches streamed from shards by a webdataset loader (see data/loader.py), epoch after epoch.

    ``make_loader(seed, batch_size)`` returns one epoch's stream, a deterministic function of its seed; with
    ``epoch_steps`` (resampled shards, an endless stream) an epoch is that many batches.  ``position`` (epoch,
    batches consumed) goes into checkpoints: a resumed run replays the interrupted epoch's stream up to it and
    continues with the very next batch.
    """

    def __init__(self, make_loader: Callable[[int, int], object], fingerprint: str, distill: bool,
                 epoch_steps: int | None = None):
        self.make_loader, self.fingerprint, self.has_targets = make_loader, fingerprint, distill
        self.epoch_steps = epoch_steps
        self.faults = Faults()  # skipped samples by reason, truncated shards
        self.position = (0, 0)

    @property
    def skipped(self) -> int:
        return self.faults.skipped

    def digest(self) -> str:
        return self.fingerprint

    def batches(self, cfg: TrainParams, start: int, rank: int = 0, world_size: int = 1, position=None):
        if world_size > 1 and self.epoch_steps is None:
            raise ValueError("streaming on several ranks needs resampled shards (train.resample: true)")
        epoch, offset = position if position is not None else (0, 0)
        step = start
        while step < cfg.steps:
            produced = 0
            for i, batch in enumerate(self.make_loader(cfg.seed * 100_003 + epoch, cfg.batch_size // world_size)):
                if self.epoch_steps is not None and i >= self.epoch_steps:
                    break
                if i < offset:  # replaying the interrupted epoch up to the checkpoint
                    continue
                self.position = (epoch, i + 1)
                self.faults.merge(batch["skipped_by_reason"], batch["truncated"])
                if len(batch["key"]) < 2:
                    continue
                produced += 1
                yield batch
                step += 1
                if step >= cfg.steps:
                    return
            if produced == 0 and offset == 0:
                raise RuntimeError(f"epoch {epoch} of the streaming loader produced no batch: "
                                   f"{self.faults.summary()} so far")
            epoch, offset = epoch + 1, 0


def shard_dir(paths: Paths, source: str, recaptioned: bool = False) -> Path:
    """The training shards: the CAT-filtered ones, or the raw ones (train.source: raw, no CAT filter); with FFF's
    pseudo-captions in their json "captions" when recaptioned (recaption.enabled)."""
    return (output_dir if recaptioned else input_dir)(paths.data, source)


def streaming_data(cfg: TrainParams, missing: str, shards: Path, labels: Path | None, image_size: int, tokenizer,
                   sizes: dict | None, max_pixels: int) -> StreamingData:
    """Shards streamed by the webdataset loader, pseudo-labels (from ``labels``, when ``sizes``) joined by key in
    the workers."""
    pseudo = SparsePseudoLabels(labels, sizes["objects"], sizes["attributes"]) if sizes else None
    h = hashlib.sha256()
    for f in shard_paths(shards) + (sorted(labels.glob("*.npz")) if sizes else []):
        h.update(f.read_bytes())
    # the stream also depends on these: a resume under other ones must not reuse the position
    h.update(json.dumps([cfg.resample, cfg.workers, os.environ.get("WORLD_SIZE", "1")]).encode())

    def loader(seed: int, batch_size: int):
        return make_loader(shards, image_size, tokenizer, batch_size, max_pixels, seed, cfg, pseudo, missing)

    epoch_steps = math.ceil(count_samples(shards) / cfg.batch_size) if cfg.resample else None
    return StreamingData(loader, h.hexdigest()[:16], distill=sizes is not None, epoch_steps=epoch_steps)


def vocab_sizes(paths: Paths) -> dict:
    """{"objects": n, "attributes": n}: the sizes of the concept vocabularies the pseudo-labels index."""
    return json.loads((Path(paths.data) / "pseudo_labels" / "vocab_sizes.json").read_text())


def training_data(p: Params, image_size: int, tokenizer, sizes: dict | None):
    """The training set the params ask for, in memory or streamed; with pseudo-labels when ``sizes`` is given
    (distillation)."""
    labels = Path(p.paths.data) / "pseudo_labels"
    shards = shard_dir(p.paths, p.train.source, p.recaption.enabled)
    max_pixels = p.download.url_list.max_pixels  # the one pixel limit of every stage that reads images
    if p.train.loader == "webdataset":
        return streaming_data(p.resolved_train(), p.pseudo_labels.missing, shards, labels, image_size, tokenizer,
                              sizes, max_pixels)
    pseudo = load_all(labels, sizes["objects"], sizes["attributes"]) if sizes else None
    return load_train_set(shards, image_size, tokenizer, max_pixels, pseudo, p.pseudo_labels.missing,
                          drop_planted=tuple(p.train.drop_planted))
