"""Eval metrics vs CLIP_benchmark's own computations on random inputs."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from clip_benchmark.metrics.zeroshot_classification import accuracy as _cb_accuracy
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from diht_core.eval.retrieval import block_retrieval_metrics, retrieval_metrics
from diht_core.eval.vqa import vqa_accuracy
from diht_core.eval.zeroshot import build_classifier, classification_metrics, zero_shot_classification


def accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's accuracy(); its float(1-element array) raises TypeError on numpy >= 2.4,
    so fall back to the same computation with .item()."""
    try:
        return _cb_accuracy(output, target, topk=topk)
    except TypeError:
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def cb_classification(logits, target):
    """CLIP_benchmark zeroshot_classification.evaluate, single-label branch."""
    C = logits.shape[1]
    if C >= 5:
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
    else:
        acc1, = accuracy(logits, target, topk=(1,))
        acc5 = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # y_pred may contain classes absent from y_true
        mpcr = balanced_accuracy_score(target, logits.argmax(axis=1))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mpcr}


def cb_retrieval(images_emb, texts_emb, texts_image_index, ks, batch_size=16):
    """CLIP_benchmark zeroshot_retrieval.evaluate after the embedding loop."""
    images_emb, texts_emb = F.normalize(images_emb, dim=-1), F.normalize(texts_emb, dim=-1)
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    m = {}
    for k in ks:
        m[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0).float().mean().item()
        m[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0).float().mean().item()
    return m


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("C", [3, 4, 5, 10])
def test_classification_metrics_match_clip_benchmark(C):
    g = torch.Generator().manual_seed(C)
    N = 300
    target = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(N, C, generator=g) + 1.5 * F.one_hot(target, C)  # informative, not perfect
    ours, ref = classification_metrics(logits, target), cb_classification(logits, target)
    assert set(ours) == set(ref)
    for key in ref:
        assert same(ours[key], ref[key]), (key, ours[key], ref[key])
    assert 0.2 < ours["acc1"] < 0.95
    assert math.isnan(ours["acc5"]) == (C < 5)
    if C >= 5:
        assert ours["acc5"] > ours["acc1"]


def test_mean_per_class_recall_only_over_present_classes():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (200,), generator=g)  # classes 4..6 never appear as targets
    target[:5] = 0
    logits = torch.randn(200, 7, generator=g)
    ours, ref = classification_metrics(logits, target), cb_classification(logits, target)
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], rel=1e-12)
    assert ours["acc1"] == ref["acc1"] and ours["acc5"] == ref["acc5"]


def test_build_classifier_formula_and_prompts():
    g = torch.Generator().manual_seed(0)
    table, seen = {}, []

    def encode(texts):
        seen.extend(texts)
        for t in texts:  # varied norms, so normalise-before-average matters
            table.setdefault(t, torch.randn(16, generator=g) * (0.1 + 5 * torch.rand(1, generator=g)))
        return torch.stack([table[t] for t in texts])

    classnames, templates = ["cat", "dog", "car"], ["a photo of a {c}.", "{c}", "a blurry {c} photo"]
    W = build_classifier(encode, classnames, templates)
    assert W.shape == (16, 3)
    assert seen == [t.format(c=c) for c in classnames for t in templates]
    for j, c in enumerate(classnames):
        e = torch.stack([table[t.format(c=c)] for t in templates])
        avg = (e / e.norm(dim=1, keepdim=True)).mean(0)
        torch.testing.assert_close(W[:, j], avg / avg.norm())
        naive = e.mean(0) / e.mean(0).norm()  # the wrong recipe must differ
        assert not torch.allclose(W[:, j], naive, atol=1e-3)
    torch.testing.assert_close(W.norm(dim=0), torch.ones(3))


def test_zero_shot_classification_uses_normalised_images_times_100():
    g = torch.Generator().manual_seed(2)
    clf = F.normalize(torch.randn(32, 6, generator=g), dim=0)
    targets = torch.randint(0, 6, (150,), generator=g)
    img = (clf.T[targets] + 0.25 * torch.randn(150, 32, generator=g)) * torch.rand(150, 1, generator=g) * 10
    ours = zero_shot_classification(img, clf, targets)
    ref = cb_classification(100.0 * F.normalize(img, dim=-1) @ clf, targets)
    for key in ref:
        assert same(ours[key], ref[key]), key
    assert 0.3 < ours["acc1"] < 1.0


def retrieval_data(n_img, caps_per_img, seed, noise=3.0, d=32, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d, generator=g)
    t2i = torch.arange(n_img).repeat_interleave(caps_per_img)
    if shuffle:
        t2i = t2i[torch.randperm(len(t2i), generator=g)]
    txt = img[t2i] + noise * torch.randn(len(t2i), d, generator=g)
    return img, txt, t2i


KS = (1, 5, 10)


@pytest.mark.parametrize("n_img,caps", [(60, 5), (90, 1)])
def test_retrieval_matches_clip_benchmark(n_img, caps):
    img, txt, t2i = retrieval_data(n_img, caps, seed=n_img)
    ours, ref = retrieval_metrics(img, txt, t2i, ks=KS), cb_retrieval(img, txt, t2i, KS)
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v, abs=1e-7), key
    assert 0.05 < ours["image_retrieval_recall@1"] < 0.95 and 0.05 < ours["text_retrieval_recall@1"] < 0.95
    assert ours["mean_recall@1"] == pytest.approx(
        0.5 * (ref["image_retrieval_recall@1"] + ref["text_retrieval_recall@1"]))
    if caps > 1:  # "any of its 5 captions" is easier than one caption
        assert ours["text_retrieval_recall@1"] > ours["image_retrieval_recall@1"]


def test_retrieval_image_without_captions_is_a_miss_like_clip_benchmark():
    img, txt, t2i = retrieval_data(30, 3, seed=3, noise=0.1)
    keep = (t2i != 4) & (t2i != 17)
    ours, ref = retrieval_metrics(img, txt[keep], t2i[keep], ks=KS), cb_retrieval(img, txt[keep], t2i[keep], KS)
    for key, v in ref.items():
        assert ours[key] == pytest.approx(v, abs=1e-7), key
    assert ours["text_retrieval_recall@10"] == pytest.approx(28 / 30)


def test_retrieval_list_input_and_unnormalised_scale_invariance():
    img, txt, t2i = retrieval_data(40, 2, seed=5)
    a = retrieval_metrics(img, txt, t2i.tolist())
    b = retrieval_metrics(img * 7.0, txt * 0.01, t2i)
    assert a == b


def test_retrieval_chunked_equals_unchunked():
    img, txt, t2i = retrieval_data(75, 5, seed=7)
    big = retrieval_metrics(img, txt, t2i, ks=KS, chunk_size=10**6)
    for cs in (1, 7, 64):
        assert retrieval_metrics(img, txt, t2i, ks=KS, chunk_size=cs) == big


def test_retrieval_blocks_equal_separate_runs():
    img, txt, t2i = retrieval_data(50, 5, seed=11)
    blocks = [{"images": (0, 20), "full": True}, {"images": (20, 40), "full": True},
              {"images": (40, 50), "full": False}]  # a partial block: reported, not averaged
    out = block_retrieval_metrics(img, txt, t2i, blocks, ks=KS)
    assert len(out["blocks"]) == 3 and (out["full_blocks"], out["partial_blocks"]) == (2, 1)
    for bi, (s, e) in enumerate([(0, 20), (20, 40), (40, 50)]):
        sel = (t2i >= s) & (t2i < e)
        sep = retrieval_metrics(img[s:e], txt[sel], t2i[sel] - s, ks=KS)
        ref = cb_retrieval(img[s:e], txt[sel], t2i[sel] - s, KS)
        assert {k: v for k, v in out["blocks"][str(bi)].items() if k in sep} == sep
        assert out["blocks"][str(bi)]["images"] == e - s
        for key, v in ref.items():
            assert sep[key] == pytest.approx(v, abs=1e-7)
    for key in sep:
        assert out[key] == pytest.approx((out["blocks"]["0"][key] + out["blocks"]["1"][key]) / 2)
    # smaller galleries are easier than the full one
    full = retrieval_metrics(img, txt, t2i, ks=KS)
    assert out["image_retrieval_recall@1"] > full["image_retrieval_recall@1"]


def test_vqa_planted():
    g = torch.Generator().manual_seed(0)
    N, A, d = 40, 4, 24
    st = torch.randn(N, A, d, generator=g)
    labels = torch.randint(0, A, (N,), generator=g)
    qtypes = ["color" if i % 2 == 0 else "count" for i in range(N)]
    # plant: "color" questions right except i=0,2,4; "count" right only for i % 4 == 1
    right = torch.tensor([(q == "color" and i not in (0, 2, 4)) or (q == "count" and i % 4 == 1)
                          for i, q in enumerate(qtypes)])
    target = torch.where(right, labels, (labels + 1) % A)
    img = 3.0 * st[torch.arange(N), target] + 0.05 * torch.randn(N, d, generator=g)
    out = vqa_accuracy(img, st, labels, qtypes)
    assert out["accuracy"] == pytest.approx(right.float().mean().item())
    assert out["accuracy/color"] == pytest.approx(17 / 20)
    assert out["accuracy/count"] == pytest.approx(10 / 20)
    assert out["chance"] == pytest.approx(0.25)
    assert "accuracy/color" not in vqa_accuracy(img, st, labels)


def test_vqa_padded_candidates():
    g = torch.Generator().manual_seed(1)
    st = torch.randn(3, 4, 8, generator=g)
    st[0, 2:] = float("nan")  # question 0 has 2 candidates, question 1 has 3
    st[1, 3] = float("nan")
    labels = torch.tensor([1, 0, 3])
    img = st[torch.arange(3), labels].clone()
    out = vqa_accuracy(img, st, labels)
    assert out["accuracy"] == 1.0
    # all real candidates score negative: padding must still never be picked
    st2 = torch.full((1, 3, 8), float("nan"))
    st2[0, 0], st2[0, 1] = F.one_hot(torch.tensor(0), 8).float(), F.one_hot(torch.tensor(1), 8).float()
    img2 = -(st2[0, 0] + 2 * st2[0, 1])[None]
    assert vqa_accuracy(img2, st2, torch.tensor([0]))["accuracy"] == 1.0
    assert out["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
