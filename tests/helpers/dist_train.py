"""Run by tests under torchrun (or alone): a few steps of `train` on a fixed random batch stream, states saved.

python tests/helpers/dist_train.py OUT STRATEGY LOSS [ACCUM] [K] [OPT] [INTERRUPT_AT]

OPT sgd (default; its update is proportional to the gradient, so a wrongly scaled gradient shows, which
Adam's normalised update would hide) or adamw. INTERRUPT_AT > 0: every rank raises at that step (the
checkpoint of the step before is on disk; checkpoints every 2 steps), to test a resume.
"""

import os
import sys

import torch

import diht_core.train.optim as T
from diht_core.config import TrainParams
from diht_core.train.distributed import destroy, full_model_state, init_distributed
from diht_core.models import ConceptHeads, create_model
from diht_core.train import TrainSet, train


def make_data(n=16, size=48, ctx=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (n * 2, ctx), generator=g)
    index = [[2 * i, 2 * i + 1] for i in range(n)]
    obj, attr = torch.rand(n, 7, generator=g).softmax(-1), torch.rand(n, 5, generator=g).softmax(-1)
    return TrainSet([f"{i}" for i in range(n)], images, tokens, index, obj, attr)


def main(out, strategy, loss, accum=1, k=1, opt="sgd", interrupt_at=0):
    info = init_distributed(os.environ.get("DIHT_DEVICE", "cpu"))
    if opt == "sgd":
        T.adamw = lambda params, cfg: torch.optim.SGD(list(params), lr=cfg.lr)
    if int(interrupt_at):
        lr_of = T.cosine_lr

        def cosine_lr(step, *a):
            if step == int(interrupt_at):
                raise SystemExit(f"interrupted at step {step}")
            return lr_of(step, *a)
        T.cosine_lr = cosine_lr
    torch.manual_seed(0)
    sig = {"init_logit_bias": -10.0} if loss == "sigmoid" else {}
    model, _, _ = create_model("diht-tiny-vit", **sig)
    heads = ConceptHeads(model.visual.output_dim, 7, 5)
    init = {n: v.clone() for n, v in model.state_dict().items()}
    fff = {"fff_tt_threshold": 0.9} if loss == "sigmoid" else {}
    cfg = TrainParams(seed=0, steps=3, batch_size=8, lr=0.1 if opt == "sgd" else 1e-3, warmup_steps=1, loss=loss,
                      strategy=strategy, accum_steps=int(accum), captions_per_image=int(k), lambda_obj=0.5,
                      lambda_attr=0.5, checkpoint_every=2, log_every=1,
                      hn_beta=0.5 if loss == "hn-nce" else 0.0, precision=os.environ.get("DIHT_PRECISION", "fp32"),
                      compile=os.environ.get("DIHT_COMPILE", "0") == "1", **fff)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on a GPU as on the CPU (the patch embedding is a conv)
    torch.backends.cudnn.allow_tf32 = False
    summary = train(model, make_data(), cfg, f"{out}.ckpt", heads=heads, dist=info)
    state = full_model_state(model, strategy, info)
    if info.is_main:
        torch.save({"model": state, "init": init, "heads": heads.state_dict(),
                    "losses": [h["loss"] for h in summary["history"]],
                    "grad_scale": [h.get("grad_scale", 0.0) for h in summary["history"]],
                    "resumed_from": summary["resumed_from_step"]},
                   out)
    destroy(info)


if __name__ == "__main__":
    main(*sys.argv[1:])
