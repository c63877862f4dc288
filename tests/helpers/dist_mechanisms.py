"""Run by tests/test_mechanisms.py under torchrun (2 gloo ranks): the mechanism measurements of one batch split over
the ranks, rank 0's result written as json.

python -m torch.distributed.run --standalone --nproc-per-node=2 tests/helpers/dist_mechanisms.py OUT
"""

import json
import sys

import torch

from diht_core.config import TrainParams
from diht_core.train.distributed import destroy, init_distributed
from diht_core.train.mechanisms import measure

HN = TrainParams(seed=0, loss="hn-nce", hn_beta=0.7)
FFF = TrainParams(seed=0, loss="sigmoid", fff_it_threshold=0.5)


def batch():
    """8 images (features, scene ids, one unknown) and a mined matrix: the true pairs plus random wrong merges."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    scenes = torch.tensor([0, 0, 1, 2, 1, 3, 3, -1])
    mined = (scenes[:, None] == scenes[None, :]) | (torch.rand(8, 8, generator=g) > 0.8)
    return img, txt, scenes, mined


def measured(info, rows=slice(None)):
    img, txt, scenes, mined = batch()
    scale = torch.tensor(5.0)
    return {**measure(HN, scenes[rows], img[rows], txt[rows], scale, None, info),
            **measure(FFF, scenes[rows], img[rows], txt[rows], scale, mined[rows], info)}


if __name__ == "__main__":
    info = init_distributed("cpu")
    n = 8 // info.world_size
    got = measured(info, slice(info.rank * n, (info.rank + 1) * n))
    if info.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(got, f)
    destroy(info)
