"""Few-shot PGD probe vs scratch probe on synthetic Gaussian clusters."""

import pytest
import torch
import torch.nn.functional as F

from diht_core.config import FewshotParams
from diht_core.eval.fewshot import kshot_indices, pgd_probe, probe_accuracy, run_fewshot, scratch_probe
from diht_core.eval.zeroshot import zero_shot_classification


def clusters(seed=0, d=128, C=4, sigma=0.35, w0_noise=0.12):
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(C, d, generator=g), dim=-1)

    def draw(n):
        y = torch.arange(n) % C
        return mu[y] + sigma * torch.randn(n, d, generator=g), y

    (trx, tr_y), (vx, vy), (tx, ty) = draw(64), draw(80), draw(80)
    W0 = F.normalize(mu + w0_noise * torch.randn(C, d, generator=g), dim=-1).T  # good, imperfect zero-shot head
    return trx, tr_y, vx, vy, tx, ty, W0


def test_delta_zero_is_zero_shot_exactly():
    trx, tr_y, vx, vy, tx, ty, W0 = clusters()
    W, b = pgd_probe(trx[:8], tr_y[:8], W0, delta=0.0, delta_b=0.0, f=FewshotParams(steps=50))
    assert torch.equal(W, W0) and torch.equal(b, torch.zeros(4))
    zs = zero_shot_classification(tx, W0, ty)["acc1"]
    assert probe_accuracy(tx, ty, W, b) == pytest.approx(zs, abs=1e-12)
    assert 0.4 < zs < 1.0
    out = run_fewshot(trx, tr_y, vx, vy, tx, ty, W0, FewshotParams(shots=[1, 4], seeds=2, deltas=[0.0],
                      delta_bs=[0.0], weight_decays=[0.0], steps=20, lr=0.05))
    assert out["zero_shot"] == pytest.approx(zs, abs=1e-12)
    for row in out["curve"]:
        assert row["pgd_mean"] == pytest.approx(zs, abs=1e-12) and row["pgd_std"] == pytest.approx(0, abs=1e-12)


def test_pgd_respects_constraints_and_moves():
    trx, tr_y, *_, W0 = clusters(seed=1)
    W, b = pgd_probe(trx, tr_y, W0, delta=0.5, delta_b=0.2, f=FewshotParams(steps=100))
    assert (W - W0).norm() <= 0.5 + 1e-5 and b.norm() <= 0.2 + 1e-6
    assert (W - W0).norm() > 0.4  # the constraint is active, not trivially satisfied
    W2, b2 = pgd_probe(trx, tr_y, W0, delta=0.5, delta_b=0.2, f=FewshotParams(steps=100))
    assert torch.equal(W, W2) and torch.equal(b, b2)  # deterministic
    Wbig, _ = pgd_probe(trx, tr_y, W0, delta=100.0, delta_b=100.0, f=FewshotParams(steps=100))
    assert (Wbig - W0).norm() > 0.5


def test_scratch_probe_fits_and_weight_decay_shrinks():
    trx, tr_y, *_ = clusters(seed=2)
    W, b = scratch_probe(trx, tr_y, weight_decay=0.0, f=FewshotParams(steps=100))
    assert probe_accuracy(trx, tr_y, W, b) == 1.0
    Wd, _ = scratch_probe(trx, tr_y, weight_decay=0.1, f=FewshotParams(steps=100))
    assert Wd.norm() < 0.5 * W.norm()


def test_kshot_indices():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 12)
    for k in (1, 3, 5):
        idx = kshot_indices(labels, k, seed=4)
        counts = torch.bincount(labels[idx], minlength=4).tolist()
        assert counts == [k, k, min(k, 3), k]
        assert len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, kshot_indices(labels, k, seed=4))
    assert not torch.equal(kshot_indices(labels, 5, seed=0), kshot_indices(labels, 5, seed=1))


def test_pgd_beats_scratch_at_one_shot():
    trx, tr_y, vx, vy, tx, ty, W0 = clusters()
    out = run_fewshot(trx, tr_y, vx, vy, tx, ty, W0, FewshotParams(shots=[1, 16], seeds=3,
                      deltas=[0.0, 0.1, 0.3, 1.0, 3.0], delta_bs=[0.0, 0.1, 0.3, 1.0, 3.0],
                      weight_decays=[0.0, 1e-4, 1e-3, 1e-2], steps=200, lr=0.05))
    one, full = out["curve"]
    assert set(one) == {"k", "pgd_mean", "pgd_std", "scratch_mean", "scratch_std", "best_delta", "best_delta_b",
                        "best_weight_decay"}
    assert one["k"] == 1 and len(one["best_delta"]) == 3
    assert one["pgd_mean"] > one["scratch_mean"] + 0.15
    assert full["scratch_mean"] > one["scratch_mean"]  # more shots help the scratch probe


def test_curve_starts_at_zero_shot():
    import torch

    from diht_core.eval.fewshot import probe_accuracy, run_fewshot

    g = torch.Generator().manual_seed(0)
    W0 = torch.nn.functional.normalize(torch.randn(8, 3, generator=g), dim=0)
    y = torch.arange(3).repeat(10)
    x = torch.nn.functional.normalize(W0.T[y] + 0.5 * torch.randn(30, 8, generator=g), dim=-1)
    res = run_fewshot(x, y, x, y, x, y, W0, FewshotParams(shots=[0, 1], seeds=2, deltas=[0.0, 0.5],
                      delta_bs=[0.0, 0.5], weight_decays=[0.0], steps=5, lr=0.05))
    k0 = res["curve"][0]
    assert k0["k"] == 0 and k0["pgd_mean"] == res["zero_shot"] == probe_accuracy(x, y, W0, torch.zeros(3))
    assert k0["scratch_mean"] == pytest.approx(1 / 3)
    assert res["curve"][1]["k"] == 1


def test_delta_b_grid_is_searched_separately():
    from diht_core.eval.fewshot import run_fewshot

    trx, tr_y, vx, vy, tx, ty, W0 = clusters()
    out = run_fewshot(trx, tr_y, vx, vy, tx, ty, W0, FewshotParams(shots=[2], seeds=1, deltas=[0.0, 1.0],
                      delta_bs=[0.0, 0.7], weight_decays=[0.0], steps=20, lr=0.05))
    row = out["curve"][0]
    assert row["best_delta"][0] in (0.0, 1.0) and row["best_delta_b"][0] in (0.0, 0.7)
