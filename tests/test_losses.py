import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from diht_core.losses import ConceptDistillationLoss, ContrastiveLoss, SoftTargetCrossEntropy, create_loss


def _feats(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def _loop_infonce(img, txt, scale):
    n = len(img)
    total = 0.0
    for i in range(n):
        s_i2t = [scale * float(img[i] @ txt[j]) for j in range(n)]
        s_t2i = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -s_i2t[i] + math.log(sum(math.exp(s) for s in s_i2t))
        total += -s_t2i[i] + math.log(sum(math.exp(s) for s in s_t2i))
    return total / (2 * n)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_infonce_equals_open_clip_and_loop(scale):
    img, txt = _feats()
    ours = ContrastiveLoss()(img, txt, torch.tensor(scale))
    assert torch.allclose(ours, ClipLoss()(img, txt, torch.tensor(scale)), atol=1e-5)
    assert ours.item() == pytest.approx(_loop_infonce(img, txt, scale), rel=1e-4)


def test_soft_target_ce_equals_loop_and_hard_ce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, generator=g)
    target = torch.softmax(torch.randn(5, 7, generator=g), -1)
    loop = sum(-sum(target[i, c] * torch.log_softmax(logits[i], -1)[c] for c in range(7)) for i in range(5)) / 5
    assert SoftTargetCrossEntropy()(logits, target).item() == pytest.approx(float(loop), rel=1e-5)
    labels = torch.tensor([0, 3, 6, 1, 2])
    assert SoftTargetCrossEntropy()(logits, F.one_hot(labels, 7).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_distillation_weights():
    g = torch.Generator().manual_seed(2)
    lo, la = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    to, ta = torch.softmax(torch.randn(4, 5, generator=g), -1), torch.softmax(torch.randn(4, 3, generator=g), -1)
    ce = SoftTargetCrossEntropy()
    assert ConceptDistillationLoss(0, 0)(lo, la, to, ta).item() == 0
    assert ConceptDistillationLoss(0.5, 2.0)(lo, la, to, ta).item() == pytest.approx(
        0.5 * ce(lo, to).item() + 2.0 * ce(la, ta).item(), rel=1e-6)


def test_unbuilt_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="not built yet"):
        create_loss("hn-nce")
