"""Stage `recaption`: FFF's pseudo-captions, K per image, written into the json "captions" of the training shards
(off unless recaption.enabled; the flow then skips it and, under DVC, it only records that it is off)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diht_core.data.recaption import input_dir, output_dir, recaption_shards

from ._stage import cli, make_task

# the recaption params that decide the captions (not device placement alone: identity() adds device and dtype)
CAPTION_FIELDS = ("kind", "num_captions", "do_sample", "top_p", "temperature", "max_new_tokens", "min_new_tokens",
                  "batch_size")


def body(p, run) -> dict:
    c = p.recaption
    if not c.enabled:
        Path(p.paths.data, "recaptioned").mkdir(parents=True, exist_ok=True)  # DVC's output of this stage
        print("[recaption] recaption.enabled is false: nothing to do (train reads the shards of train.source)")
        return {"enabled": False}
    from diht_core.models.captioners import identity, make_captioner

    seed = c.seed if c.seed is not None else p.seed
    max_pixels = p.download.url_list.max_pixels
    run_digest = hashlib.sha256(json.dumps({**{k: getattr(c, k) for k in CAPTION_FIELDS}, "seed": seed,
                                            "max_pixels": max_pixels, "model": identity(c)},
                                           sort_keys=True).encode()).hexdigest()[:16]
    src, out = input_dir(p.paths.data, p.train.source), output_dir(p.paths.data, p.train.source)
    metrics = recaption_shards(src, out, lambda: make_captioner(c).caption, run_digest, seed, c.batch_size,
                               max_pixels)
    print(f"[recaption] {metrics['shards']} shards of {src} ({metrics['shards_resumed']} already done, reused): "
          f"{metrics['images']} images, {metrics['captions_written']} captions written to {out}; "
          f"skipped {metrics['skipped_by_reason']}")
    for name, cut in metrics["truncated_shards"].items():
        print(f"[recaption] shard {name} is truncated after {cut['read']} samples; the rest is lost ({cut['error']})")
    return {**metrics, "kind": c.kind, "model_path": str(Path(c.model_path)), "num_captions": c.num_captions,
            "source": p.train.source}


recaption = make_task("recaption", body)

if __name__ == "__main__":
    cli("recaption", body)
