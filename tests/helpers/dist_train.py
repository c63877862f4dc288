"""Run by tests under torchrun (or alone): a few steps of `train` on a fixed random batch stream, final state saved.

python tests/helpers/dist_train.py OUT STRATEGY LOSS [ACCUM] [K]
"""

import os
import sys

import torch

from diht_core.distributed import destroy, full_model_state, init_distributed
from diht_core.models import ConceptHeads, create_model
from diht_core.train import TrainConfig, TrainSet, train


def make_data(n=16, k=1, size=48, ctx=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (n * 2, ctx), generator=g)
    index = [[2 * i, 2 * i + 1] for i in range(n)]
    obj, attr = torch.rand(n, 7, generator=g).softmax(-1), torch.rand(n, 5, generator=g).softmax(-1)
    return TrainSet([f"{i}" for i in range(n)], images, tokens, index, obj, attr)


def main(out, strategy, loss, accum=1, k=1):
    info = init_distributed(os.environ.get("DIHT_DEVICE", "cpu"))
    torch.manual_seed(0)
    sig = {"init_logit_bias": -10.0} if loss == "sigmoid" else {}
    model, _, _ = create_model("diht-tiny-vit", **sig)
    heads = ConceptHeads(model.visual.output_dim, 7, 5)
    fff = {"fff_tt_threshold": 0.9} if loss == "sigmoid" else {}
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, loss=loss, strategy=strategy,
                      accum_steps=int(accum), captions_per_image=int(k), lambda_obj=0.5, lambda_attr=0.5,
                      checkpoint_every=100, log_every=1, hn_beta=0.5 if loss == "hn-nce" else 0.0, **fff)
    torch.backends.cuda.matmul.allow_tf32 = False
    summary = train(model, make_data(), cfg, f"{out}.ckpt", heads=heads, dist=info)
    state = full_model_state(model, strategy, info)
    if info.is_main:
        torch.save({"model": state, "heads": heads.state_dict(), "losses": [h["loss"] for h in summary["history"]]},
                   out)
    destroy(info)


if __name__ == "__main__":
    main(*sys.argv[1:])
