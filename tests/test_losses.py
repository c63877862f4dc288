import math
import os

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from diht_core.train.losses import (ConceptDistillationLoss, ContrastiveLoss, HardNegativeContrastiveLoss, SigmoidLoss,
                              SoftTargetCrossEntropy, _HardNegativeNCE, _or_similar_, create_loss,
                              mine_false_negatives)


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


# ---------------------------------------------------------------------------------------------------------------
# create_loss


def test_create_loss_builds_the_known_losses():
    assert type(create_loss("infonce")) is ContrastiveLoss
    hn = create_loss("hn-nce", alpha=0.5, beta=0.25)
    assert type(hn) is HardNegativeContrastiveLoss and (hn.alpha, hn.beta) == (0.5, 0.25)
    assert type(create_loss("sigmoid", rank=1, world_size=2)) is SigmoidLoss


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown loss 'triplet'.*infonce, hn-nce, sigmoid"):
        create_loss("triplet")


# ---------------------------------------------------------------------------------------------------------------
# HN-NCE


def _loop_hn_nce(img, txt, scale, alpha, beta):
    """The report's formula (section 3.3) term by term, in float64 Python arithmetic, mean over the batch and the
    two directions."""
    n = len(img)
    s = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]  # s[i][j] = x_i.t_j / tau
    total = 0.0
    for i in range(n):
        # image i -> texts: negatives t_j, j != i
        norm = sum(math.exp(beta * s[i][k]) for k in range(n) if k != i)
        den = alpha * math.exp(s[i][i])
        for j in range(n):
            if j != i:
                den += math.exp(s[i][j]) * (n - 1) * math.exp(beta * s[i][j]) / norm
        total += -math.log(math.exp(s[i][i]) / den)
        # text i -> images: negatives x_j, j != i
        norm = sum(math.exp(beta * s[k][i]) for k in range(n) if k != i)
        den = alpha * math.exp(s[i][i])
        for j in range(n):
            if j != i:
                den += math.exp(s[j][i]) * (n - 1) * math.exp(beta * s[j][i]) / norm
        total += -math.log(math.exp(s[i][i]) / den)
    return total / (2 * n)


@pytest.mark.parametrize("alpha,beta,scale", [(1.0, 0.0, 10.0), (0.5, 0.0, 10.0), (1.0, 0.5, 10.0),
                                              (0.3, 2.0, 5.0), (0.05, 4.0, 3.0), (0.8, 1.0, 1.0)])
def test_hn_nce_equals_loop(alpha, beta, scale):
    img, txt = _feats(n=7, seed=3)
    ours = HardNegativeContrastiveLoss(alpha, beta)(img, txt, torch.tensor(scale))
    assert ours.item() == pytest.approx(_loop_hn_nce(img.double(), txt.double(), scale, alpha, beta), rel=1e-5)


def test_hn_nce_gradient_is_exact():
    """The fused backward against finite differences (float64), w.r.t. both feature tensors and the scale."""
    img, txt = _feats(n=6, d=5, seed=4)
    args = (img.double().requires_grad_(), txt.double().requires_grad_(),
            torch.tensor(3.0, dtype=torch.float64, requires_grad=True))
    for alpha, beta in [(1.0, 0.0), (0.4, 0.0), (0.7, 1.5)]:
        assert torch.autograd.gradcheck(HardNegativeContrastiveLoss(alpha, beta), args)


def _hn_nce_torch(img, txt, scale, alpha, beta, detach_weights):
    """The formula in plain autograd ops (both directions), its weights optionally computed without gradient."""
    logits = scale * img @ txt.T
    n = len(img)
    eye = torch.eye(n, dtype=torch.bool)
    total = 0
    for lg in (logits, logits.T):  # image anchors on rows, then text anchors on rows
        bl = (beta * lg).masked_fill(eye, -math.inf)
        w = (n - 1) * torch.softmax(bl.detach() if detach_weights else bl, dim=1)
        den = alpha * lg.diagonal().exp() + (w * lg.exp()).sum(1)
        total = total + (den.log() - lg.diagonal()).mean()
    return total / 2


@pytest.mark.parametrize("detach", [False, True])
def test_hn_nce_gradient_with_and_without_detached_weights(detach):
    """The fused backward equals autograd of the formula, the weights with gradient (the formula's) or as
    constants (hn_detach_weights); the loss value is the same either way."""
    img, txt = _feats(n=6, d=5, seed=4)
    for alpha, beta in [(1.0, 0.5), (0.7, 1.5)]:
        scale = torch.tensor(3.0, dtype=torch.float64)
        ours = _value_and_grads(HardNegativeContrastiveLoss(alpha, beta, detach_weights=detach), img.double(),
                                txt.double(), scale)
        ref = _value_and_grads(lambda i, t, s: _hn_nce_torch(i, t, s, alpha, beta, detach), img.double(),
                               txt.double(), scale)
        assert ours[0].item() == pytest.approx(_loop_hn_nce(img.double(), txt.double(), 3.0, alpha, beta), rel=1e-9)
        assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-12)
        for a, b in zip(ours[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_hn_nce_pulls_its_easiest_negatives_closer():
    """With gradient through the weights, a negative with (1 + beta) e^l < beta E_q[e^l] has a negative logit
    gradient (the loss falls as it comes closer); with detached weights every negative is pushed; the net gradient
    over an anchor's negatives (push minus pull) is the same either way."""
    img, txt = _feats(n=32, d=16, seed=5)
    logits = (14.3 * img @ txt.T).double()
    grads = {}
    for detach in (False, True):
        lg = logits.clone().requires_grad_()
        _HardNegativeNCE.apply(lg, torch.arange(32), 1, 0.0, 0.5, detach).backward()
        grads[detach] = lg.grad
    off = ~torch.eye(32, dtype=torch.bool)
    q = torch.softmax((0.5 * logits).masked_fill(~off, -math.inf), dim=1)
    tilted = (q * logits.exp()).sum(1, keepdim=True)
    pulled = (1.5 * logits.exp() < 0.5 * tilted) & off
    assert pulled.any() and (grads[False][pulled] < 0).all() and (grads[False][off & ~pulled] > 0).all()
    assert (grads[True][off] > 0).all()
    torch.testing.assert_close((grads[False] * off).sum(1), (grads[True] * off).sum(1))


def _value_and_grads(loss_fn, img, txt, *scalars):
    leaves = [x.clone().requires_grad_() for x in (img, txt, *scalars)]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_hn_nce_alpha1_beta0_is_infonce_and_open_clip(scale):
    img, txt = _feats(n=12, d=16, seed=5)
    s = torch.tensor(scale)
    hn, hn_grads = _value_and_grads(HardNegativeContrastiveLoss(1.0, 0.0), img, txt, s)
    for ref in (ContrastiveLoss(), ClipLoss()):
        val, grads = _value_and_grads(ref, img, txt, s)
        assert torch.allclose(hn, val, rtol=1e-6, atol=1e-6)
        for g, g_ref in zip(hn_grads, grads):  # image, text, logit_scale
            assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hn_nce_is_stable_in_low_precision(dtype):
    """logit_scale 100 and beta 10: beta * logits reach 1e3 (exp overflows even float64); log space copes."""
    img, txt = _feats(n=64, d=32, seed=6)
    txt = F.normalize(txt + img, dim=-1)  # positives near cos 0.7: logits ~70, beta * logits ~700
    loss = HardNegativeContrastiveLoss(alpha=0.5, beta=10.0)
    scale = torch.tensor(100.0)
    ref = loss(img, txt, scale)
    ref64 = loss(img.double(), txt.double(), scale.double())
    assert torch.isfinite(ref) and ref.item() == pytest.approx(ref64.item(), rel=1e-5)
    low = [x.to(dtype).requires_grad_() for x in (img, txt)]
    value = loss(*low, scale.to(dtype))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(x.grad).all() and x.grad.dtype == dtype for x in low)
    # the inputs' own rounding is the only difference: same loss on the rounded inputs in fp32, close to fp32's
    assert value.item() == pytest.approx(loss(*[x.detach().float() for x in low], scale).item(), rel=1e-6)
    assert value.item() == pytest.approx(ref.item(), rel=2e-3 if dtype == torch.float16 else 1e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, r"alpha must lie in \(0, 1\].*got 0.0"),
    ({"alpha": 1.5}, r"alpha must lie in \(0, 1\].*got 1.5"),
    ({"alpha": -0.5}, r"alpha must lie in \(0, 1\]"),
    ({"beta": -1.0}, r"beta must be a finite number >= 0.*got -1.0"),
    ({"beta": math.inf}, r"beta must be a finite number >= 0"),
])
def test_hn_nce_bad_params_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardNegativeContrastiveLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        create_loss("hn-nce", **kwargs)


def test_hn_nce_batch_of_one_is_a_clear_error():
    img, txt = _feats(n=1)
    with pytest.raises(ValueError, match="batch of 1 has no negatives"):
        HardNegativeContrastiveLoss(0.5, 1.0)(img, txt, torch.tensor(10.0))


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid loss (SigLIP with FFF's multiple positives)


def _loop_sigmoid(img, txt, scale, bias, positives):
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(len(txt)):
            z = scale * float(img[i] @ txt[j]) + bias
            y = 1.0 if positives[i][j] else -1.0
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    return total / n


def _planted_positives(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, n, generator=g) < 0.2
    return m | torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (2.3, 0.0), (30.0, -3.0)])
@pytest.mark.parametrize("kind", ["identity", "multi"])
def test_sigmoid_equals_loop(scale, bias, kind):
    img, txt = _feats(n=9, seed=8)
    m = torch.eye(9, dtype=torch.bool) if kind == "identity" else _planted_positives(9, seed=1)
    ours = SigmoidLoss()(img, txt, torch.tensor(scale), torch.tensor(bias), positives=m)
    assert ours.item() == pytest.approx(_loop_sigmoid(img.double(), txt.double(), scale, bias, m.tolist()), rel=1e-5)


def test_sigmoid_gradient_is_exact():
    img, txt = _feats(n=6, d=5, seed=9)
    m = _planted_positives(6, seed=2)
    args = [img.double().requires_grad_(), txt.double().requires_grad_(),
            torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda i, t, s, b: SigmoidLoss()(i, t, s, b, positives=m), args)
    assert torch.autograd.gradcheck(lambda i, t, s, b: SigmoidLoss()(i, t, s, b), args)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (100.0, -5.0)])
def test_sigmoid_without_extra_positives_is_open_clip_siglip(scale, bias):
    img, txt = _feats(n=12, d=16, seed=10)
    ref, ref_grads = _value_and_grads(SigLipLoss(), img, txt, torch.tensor(scale), torch.tensor(bias))
    for m in (None, torch.eye(12, dtype=torch.bool)):
        val, grads = _value_and_grads(lambda i, t, s, b: SigmoidLoss()(i, t, s, b, positives=m),
                                      img, txt, torch.tensor(scale), torch.tensor(bias))
        assert torch.allclose(val, ref, rtol=1e-6)
        for g, g_ref in zip(grads, ref_grads):  # image, text, logit_scale, logit_bias
            assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_is_stable_in_low_precision(dtype):
    img, txt = _feats(n=64, d=32, seed=11)
    m = _planted_positives(64, seed=3)
    scale, bias = torch.tensor(100.0), torch.tensor(-10.0)
    ref = SigmoidLoss()(img, txt, scale, bias, positives=m)
    low = [x.to(dtype).requires_grad_() for x in (img, txt)]
    value = SigmoidLoss()(*low, scale.to(dtype), bias.to(dtype), positives=m)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(x.grad).all() for x in low)
    assert value.item() == pytest.approx(ref.item(), rel=2e-3 if dtype == torch.float16 else 1e-2)


def test_sigmoid_positives_of_the_wrong_shape_are_a_clear_error():
    img, txt = _feats(n=4)
    with pytest.raises(ValueError, match=r"positives must be a bool matrix \[n, n_all\] = \[4, 4\]"):
        SigmoidLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0), positives=torch.ones(4, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# False-negative mining


def test_mining_without_rules_is_the_identity():
    img, txt = _feats(n=10, seed=12)
    m = mine_false_negatives(img, txt, None, None, None)
    assert m.dtype == torch.bool and torch.equal(m, torch.eye(10, dtype=torch.bool))
    # even a threshold no pair reaches leaves only the diagonal
    assert torch.equal(mine_false_negatives(img, txt, 1.5, 1.5, 1.5), torch.eye(10, dtype=torch.bool))


def test_mining_finds_planted_duplicates():
    img, txt = _feats(n=10, d=64, seed=13)
    txt[7] = txt[2]          # the same caption for images 2 and 7
    img[5] = img[1] * 3.0    # the same image (another scale: cosine similarity) for captions 1 and 5
    txt[4] = img[8]          # caption 4 describes image 8 exactly
    eye = torch.eye(10, dtype=torch.bool)

    def pairs(m):
        return {(i, j) for i, j in (m & ~eye).nonzero().tolist()}

    assert pairs(mine_false_negatives(img, txt, tt_threshold=0.95)) == {(2, 7), (7, 2)}
    assert pairs(mine_false_negatives(img, txt, ii_threshold=0.95)) == {(1, 5), (5, 1)}
    assert pairs(mine_false_negatives(img, txt, it_threshold=0.95)) == {(8, 4)}
    assert pairs(mine_false_negatives(img, txt, 0.95, 0.95, 0.95)) == {(2, 7), (7, 2), (1, 5), (5, 1), (8, 4)}


def test_mining_groups_make_captions_of_one_image_positives():
    img, txt = _feats(n=6, seed=14)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])  # e.g. 2 captions of image 0, 1 of image 1, 3 of image 2
    expected = groups[:, None] == groups[None, :]
    assert torch.equal(mine_false_negatives(img, txt, None, None, None, groups=groups), expected)
    with pytest.raises(ValueError, match="groups must be"):
        mine_false_negatives(img, txt, groups=torch.tensor([0, 1]))


def test_mining_takes_no_gradients_and_matches_dense_thresholding():
    img, txt = _feats(n=11, d=8, seed=15)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    m = mine_false_negatives(img, txt, 0.3, 0.2, 0.25)
    assert m.grad_fn is None and not m.requires_grad
    with torch.no_grad():
        dense = (torch.eye(11, dtype=torch.bool) | (img @ txt.T >= 0.3) | (txt @ txt.T >= 0.2)
                 | (img @ img.T >= 0.25))
    assert torch.equal(m, dense)
    # the blocked (and, for Gram matrices, mirrored) thresholding equals the dense one for any block size
    a, b = img.detach(), txt.detach()
    for x, y in ((a, b), (b, b)):
        sims = x.double() @ y.double().T
        assert ((sims - 0.2).abs() > 1e-4).all()  # no near-ties: rounding cannot flip a pair
        for block in (1, 3, 4, 11, 64):
            out = torch.zeros(11, 11, dtype=torch.bool)
            assert torch.equal(_or_similar_(out, x, y, 0.2, block=block), sims >= 0.2), block


def test_mined_positives_feed_the_sigmoid_loss():
    img, txt = _feats(n=8, d=32, seed=16)
    txt[3] = txt[6]
    m = mine_false_negatives(img, txt, tt_threshold=0.99)
    assert m[3, 6] and m[6, 3]
    ours = SigmoidLoss()(img, txt, torch.tensor(10.0), torch.tensor(-5.0), positives=m)
    assert ours.item() == pytest.approx(_loop_sigmoid(img.double(), txt.double(), 10.0, -5.0, m.tolist()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes against one process holding the whole batch

_WORLD, _LOCAL, _DIM = 2, 5, 16


def _dist_cases(rank, world_size):
    """name -> loss(image, text, scale, bias) for this rank; the same on one process with rank 0, world 1."""
    m_full = _planted_positives(_LOCAL * _WORLD, seed=4)
    rows = slice(rank * _LOCAL, (rank + 1) * _LOCAL) if world_size > 1 else slice(None)
    return {
        "infonce": lambda i, t, s, b: ContrastiveLoss(rank, world_size)(i, t, s),
        "hn-nce": lambda i, t, s, b: HardNegativeContrastiveLoss(0.6, 1.5, rank, world_size)(i, t, s),
        "hn-nce-infonce": lambda i, t, s, b: HardNegativeContrastiveLoss(1.0, 0.0, rank, world_size)(i, t, s),
        "sigmoid": lambda i, t, s, b: SigmoidLoss(rank, world_size)(i, t, s, b),
        # FFF positives: the full [n_all, n_all] matrix, or this rank's rows of it
        "sigmoid-full-M": lambda i, t, s, b: SigmoidLoss(rank, world_size)(i, t, s, b, positives=m_full),
        "sigmoid-local-M": lambda i, t, s, b: SigmoidLoss(rank, world_size)(i, t, s, b, positives=m_full[rows]),
    }


def _dist_run(rank, world_size):
    img, txt = _feats(n=_LOCAL * _WORLD, d=_DIM, seed=17)  # the whole batch; world_size 1 holds all of it
    rows = slice(rank * _LOCAL, (rank + 1) * _LOCAL) if world_size > 1 else slice(None)
    out = {}
    for name, fn in _dist_cases(rank, world_size).items():
        loss, grads = _value_and_grads(fn, img[rows], txt[rows], torch.tensor(7.0), torch.tensor(-2.0))
        out[name] = {"loss": loss, "image": grads[0], "text": grads[1], "scale": grads[2], "bias": grads[3]}
    return out


def _dist_worker(rank, world_size, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_dist_run(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_with_the_whole_batch(tmp_path):
    """The convention (open_clip's ClipLoss(local_loss=True, gather_with_grad=True)): rank r's loss is the mean
    over its local rows, so the mean over ranks is the full-batch loss; all_gather's backward sums over ranks, so
    rank r's local features get d(sum_r loss_r)/dx_r = world_size * dL_full/dx_r (DDP's average of parameter
    gradients over ranks then gives exactly the full-batch gradient); logit_scale / logit_bias are not gathered,
    so their mean over ranks is the full-batch gradient."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(_dist_worker, args=(_WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=_WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(_WORLD)]
    full = _dist_run(0, 1)
    for name, ref in full.items():
        per_rank = [r[name] for r in ranks]
        assert torch.allclose(torch.stack([r["loss"] for r in per_rank]).mean(), ref["loss"], rtol=1e-6), name
        for key in ("image", "text"):
            local = torch.cat([r[key] for r in per_rank])
            assert torch.allclose(local, _WORLD * ref[key], rtol=1e-5, atol=1e-7), (name, key)
        for key in ("scale", "bias"):
            if ref[key] is None:  # the contrastive losses take no bias
                assert all(r[key] is None for r in per_rank)
                continue
            assert torch.allclose(torch.stack([r[key] for r in per_rank]).mean(), ref[key], rtol=1e-5), (name, key)
    # and ContrastiveLoss's convention is open_clip's: its full-batch value is ClipLoss's
    img, txt = _feats(n=_LOCAL * _WORLD, d=_DIM, seed=17)
    assert torch.allclose(full["infonce"]["loss"], ClipLoss()(img, txt, torch.tensor(7.0)), rtol=1e-6)


def test_mining_with_several_captions_per_image_matches_a_loop():
    torch.manual_seed(0)
    n, k = 5, 3
    img, txt = F.normalize(torch.randn(n, 8), dim=-1), F.normalize(torch.randn(n * k, 8), dim=-1)
    txt[7] = txt[1] + 0.01 * torch.randn(8)  # caption 1 of image 2 ~ caption 1 of image 0
    img[4] = img[3] + 0.01 * torch.randn(8)
    txt, img = F.normalize(txt, dim=-1), F.normalize(img, dim=-1)
    it, tt, ii = 0.6, 0.95, 0.95
    expected = torch.zeros(n, n * k, dtype=torch.bool)
    for i in range(n):
        for j in range(n * k):
            expected[i, j] = (j // k == i or float(img[i] @ txt[j]) >= it
                              or any(float(txt[a] @ txt[j]) >= tt for a in range(i * k, i * k + k))
                              or float(img[i] @ img[j // k]) >= ii)
    got = mine_false_negatives(img, txt, it, tt, ii, captions_per_image=k)
    assert torch.equal(got, expected) and got[0, 7] and got[2, 1] and got[3, 12] and got[4, 9]
    with pytest.raises(ValueError, match="texts"):
        mine_false_negatives(img, txt[:-1], captions_per_image=k)
