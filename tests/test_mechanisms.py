"""Each mechanism measured against planted truth (train/mechanisms.py, concepts/pseudo_labels.py): known answers on
constructed batches, the loaders carrying scene ids, and the training loop recording them without changing the
model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diht_core.concepts.pseudo_labels import omitted_concept_metrics, omitted_concepts, predicted_concepts
from diht_core.config import DownloadParams, Params, ParamsError, TrainParams, validate_params
from diht_core.data.loader import make_loader
from diht_core.data.planted import (CONCEPTS, NO_SCENE, planted_concepts, read_planted_concepts, scene_id,
                                   swap_family)
from diht_core.data.pseudo_labels import save_shard
from diht_core.data.scenes import render, sample_scene
from diht_core.data.shards import encode_jpg, write_shard
from diht_core.data.synthetic import write_eval_splits
from diht_core.models import create_model, image_size
from diht_core.train import batch_indices, load_train_set, train
from diht_core.train.distributed import DistInfo
from diht_core.train.losses import _HardNegativeNCE, hn_negative_weights, mine_false_negatives
from diht_core.train.mechanisms import (hard_negative_weight_counts, hn_pulled_negatives, hn_weight_counts, measure,
                                       mechanisms_block, mining_counts, ratio, threshold_curve)

MAX_PIXELS = 89_478_485  # download.url_list.max_pixels
ONE = DistInfo(device=torch.device("cpu"))


def _precision_recall(mined, scenes, k=1):
    tp, n_mined, n_true = mining_counts(mined, scenes, scenes, captions_per_image=k)
    return ratio(tp, n_mined), ratio(tp, n_true)


def test_mining_that_merges_exactly_the_true_pairs_scores_one():
    scenes = torch.tensor([0, 0, 1, 2, 1, 1])
    feats = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    for k in (1, 2):  # groups = the scene ids: FFF's matrix marks exactly the same-scene pairs (all K captions)
        mined = mine_false_negatives(feats, feats.repeat_interleave(k, 0), groups=scenes, captions_per_image=k)
        tp, n_mined, n_true = mining_counts(mined, scenes, scenes, captions_per_image=k)
        assert (tp, n_mined, n_true) == (8, 8, 8)  # ordered pairs i != j: 2 of scene 0, 6 of scene 1
        assert _precision_recall(mined, scenes, k) == (1.0, 1.0)
    own = mine_false_negatives(feats, feats)  # no threshold: own captions only, nothing mined
    assert _precision_recall(own, scenes) == (None, 0.0)


def test_one_wrong_merge_and_one_missed_pair_are_counted():
    scenes = torch.tensor([0, 0, 1, 2, 1, 1])
    mined = scenes[:, None] == scenes[None, :]
    mined[4, 5] = mined[5, 4] = False   # a missed true pair (both directions)
    mined[2, 3] = True                  # a wrong merge: scenes 1 and 2
    assert _precision_recall(mined, scenes) == pytest.approx((6 / 7, 6 / 8))
    unknown = scenes.clone()
    unknown[3] = NO_SCENE               # the wrong merge now involves an image without planted truth: not judged
    assert _precision_recall(mined, unknown) == pytest.approx((1.0, 6 / 8))


def test_mining_thresholds_merge_near_duplicates():
    """Images of one scene with near-identical features: an image-image threshold finds exactly them."""
    g = torch.Generator().manual_seed(0)
    scenes = torch.tensor([0, 1, 0, 2, 1, 3])
    base = torch.randn(4, 16, generator=g)
    img = base[scenes] + 0.01 * torch.randn(6, 16, generator=g)
    mined = mine_false_negatives(img, torch.randn(6, 16, generator=g), ii_threshold=0.99)
    assert _precision_recall(mined, scenes) == (1.0, 1.0)


def _hand_share(logits, scenes, beta, dim):
    """The true-negative share of HN-NCE's weights, from the formula, anchor by anchor."""
    lg = logits.double().numpy() if dim == 1 else logits.double().numpy().T
    num = den = 0.0
    n = lg.shape[0]
    for i in range(n):
        neg = [j for j in range(n) if j != i]
        z = sum(math.exp(beta * lg[i, k]) for k in neg)
        for j in neg:
            w = (n - 1) * math.exp(beta * lg[i, j]) / z
            den += w
            num += w * (scenes[i] != scenes[j])
    return num / den


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_hn_true_negative_share_matches_the_formula(beta):
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scenes = torch.tensor([0, 0, 1, 2, 1])
    logits = 10.0 * img @ txt.T
    labels = torch.arange(5)
    for dim in (1, 0):  # image anchors (rows), text anchors (columns)
        w = hn_negative_weights(logits, labels, dim, beta)
        assert torch.allclose(w.sum(dim), torch.full((5,), 4.0)) and (w.diagonal() == 0).all()
        num, den = hn_weight_counts(logits, labels, dim, beta, scenes, scenes)
        assert ratio(num, den) == pytest.approx(_hand_share(logits, scenes.tolist(), beta, dim), rel=1e-6)
    if beta == 0:  # equal weights: the share of true negatives among the negatives, 16 of 20 ordered pairs
        assert ratio(*hn_weight_counts(logits, labels, 1, beta, scenes, scenes)) == pytest.approx(16 / 20)


def test_measure_records_what_ran_and_nothing_without_scene_ids():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    scenes, scale = torch.tensor([0, 0, 1, 2]), torch.tensor(10.0)
    hn = TrainParams(seed=0, loss="hn-nce", hn_beta=0.5)
    got = measure(hn, scenes, img, txt, scale, None, ONE)
    assert set(got) == {f"mechanisms/hn_true_negative_weight_share/{k}" for k in ("i2t", "t2i", "uniform")}
    assert got["mechanisms/hn_true_negative_weight_share/uniform"] == pytest.approx(10 / 12)
    logits = 10.0 * img @ txt.T  # the loss's logits: the features as given, times the scale
    for name, dim in (("i2t", 1), ("t2i", 0)):
        assert got[f"mechanisms/hn_true_negative_weight_share/{name}"] == pytest.approx(
            _hand_share(logits, scenes.tolist(), 0.5, dim), rel=1e-5)
    mined = scenes[:, None] == scenes[None, :]
    sig = TrainParams(seed=0, loss="sigmoid", fff_ii_threshold=0.9)
    got = measure(sig, scenes, img, txt, scale, mined, ONE)
    assert got == {"mechanisms/fff_mining/precision": 1.0, "mechanisms/fff_mining/recall": 1.0,
                   "mechanisms/fff_mining/mined_pairs": 2.0, "mechanisms/fff_mining/true_pairs": 2.0}
    assert measure(hn, None, img, txt, scale, None, ONE) == {}
    assert measure(hn, torch.full((4,), NO_SCENE), img, txt, scale, None, ONE) == {}
    assert measure(TrainParams(seed=0, loss="infonce"), scenes, img, txt, scale, None, ONE) == {}


def _hand_hard_share(logits, scenes, families, beta):
    """Image anchors: the share of HN-NCE's weight on the true negatives that falls on one family's, by hand."""
    num = den = 0.0
    n = len(scenes)
    for i in range(n):
        neg = [j for j in range(n) if j != i]
        z = sum(math.exp(beta * float(logits[i, j])) for j in neg)
        for j in neg:
            if scenes[i] == scenes[j]:
                continue
            w = (n - 1) * math.exp(beta * float(logits[i, j])) / z
            den += w
            num += w * (families[i] == families[j] != NO_SCENE)
    return num / den


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_hard_negative_share_matches_the_formula(beta):
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scenes, families = torch.tensor([0, 0, 1, 2, 3, 4]), torch.tensor([5, 5, 5, 7, 7, NO_SCENE])
    logits = 10.0 * img @ txt.T
    got = ratio(*hard_negative_weight_counts(logits, torch.arange(6), beta, scenes, scenes, families, families))
    assert got == pytest.approx(_hand_hard_share(logits, scenes.tolist(), families.tolist(), beta), rel=1e-6)
    if beta == 0:  # equal weights: hard pairs among the 28 ordered true-negative pairs: (0,2) (1,2) (3,4), both ways
        assert got == pytest.approx(6 / 28)
    hn = TrainParams(seed=0, loss="hn-nce", hn_beta=beta)
    rec = measure(hn, scenes, img, txt, torch.tensor(10.0), None, ONE, families)
    assert rec["mechanisms/hn_hard_negative_weight_share/i2t"] == pytest.approx(got, rel=1e-5)
    assert rec["mechanisms/hn_hard_negative_weight_share/uniform"] == pytest.approx(6 / 28)
    assert not any("hard" in k for k in measure(hn, scenes, img, txt, torch.tensor(10.0), None, ONE))


def test_threshold_curve_counts_the_pairs_by_hand():
    """Four unit vectors: 0 and 1 one scene (cos 1), 2 near 0 (cos 0.8) but another scene, 3 apart; an unknown
    scene id is left out."""
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    scenes = torch.tensor([0, 0, 1, 2, NO_SCENE])
    rows = threshold_curve(f, scenes, [0.5, 0.9, 1.1], batch_size=4)
    # t 0.5: mined (0,1) (0,2) (1,2) (2,3: cos 0.6) both ways = 8, true 2 of them; t 0.9: only (0,1); t 1.1: none
    assert [(r["precision"], r["recall"]) for r in rows] == [(0.25, 1.0), (1.0, 1.0), (None, 0.0)]
    assert rows[0]["mined_pairs_per_batch"] == pytest.approx(8.0) and rows[0]["true_pairs_per_batch"] == 2.0


def test_fff_thresholds_tool_on_a_model_file(tmp_path, capsys, monkeypatch):
    """tools/fff_thresholds.py: a model file (random weights of the real architecture) on shards with planted scene
    ids gives both rules' curves; shards without ids are refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import fff_thresholds

    _train_shards(tmp_path / "shards")
    _train_shards(tmp_path / "plain", scenes=False)
    torch.manual_seed(0)
    torch.save(create_model("diht-tiny-vit")[0].state_dict(), tmp_path / "model.pt")
    fff_thresholds.main(["--model", str(tmp_path / "model.pt"), "--shards", str(tmp_path / "shards"),
                         "--out", str(tmp_path / "curves.json")])
    curves = json.loads((tmp_path / "curves.json").read_text())["curves"]
    assert set(curves) == {"image-image", "text-text"}
    assert [r["threshold"] for r in curves["image-image"]] == fff_thresholds.THRESHOLDS
    assert all(r["true_pairs_per_batch"] > 0 for r in curves["text-text"])  # 8 pairs of one scene
    assert "| image-image | 0.98 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no planted scene ids"):
        fff_thresholds.main(["--model", str(tmp_path / "model.pt"), "--shards", str(tmp_path / "plain")])


def test_hn_pulled_negatives_counts_the_negatives_its_gradient_pulls():
    """One anchor's negatives at logits 5, 0, 0 (beta 1): the tilted mean E_q[e^l] is about e^5, so the two at 0
    ((1 + beta) e^0 < beta E_q[e^l]) are pulled and the one at 5 pushed; InfoNCE (beta 0) pulls none. The counts
    equal the signs of the loss's own gradient."""
    logits = torch.tensor([[9.0, 5.0, 0.0, 0.0], [5.0, 9.0, 0.0, 0.0], [0.0, 0.0, 9.0, 5.0], [0.0, 0.0, 5.0, 9.0]])
    got = hn_pulled_negatives(logits, beta=1.0)
    assert got["share"] == pytest.approx(2 / 3) and 0 < got["pull_to_push"] < 1
    assert hn_pulled_negatives(logits, beta=0.0) == {"share": 0.0, "pull_to_push": 0.0}
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    logits = 14.3 * f @ torch.nn.functional.normalize(f + 0.5 * torch.randn(16, 8), dim=-1).T
    grads = []
    for dim in (1, 0):
        x = logits.clone().requires_grad_()
        _HardNegativeNCE.apply(x, torch.arange(16), dim, 0.0, 0.5).backward()
        grads.append(x.grad[~torch.eye(16, dtype=torch.bool)])
    g = torch.cat(grads)
    assert hn_pulled_negatives(logits, beta=0.5)["share"] == pytest.approx(float((g < 0).float().mean()))


def test_embedding_geometry_tool_on_model_files(tmp_path, capsys, monkeypatch):
    """tools/embedding_geometry.py: two arms of model files (random weights of the real architecture, 2 seeds and 1)
    on a compositional split and training shards: every column per model, a table of the arms' means."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import embedding_geometry

    d = DownloadParams(eval={"compositional_items": 12})
    write_eval_splits(d, 0, tmp_path / "data" / "eval")
    _train_shards(tmp_path / "data" / "filtered")
    torch.manual_seed(0)
    for run, seed in (("a", 0), ("a", 1), ("b", 0)):
        (tmp_path / run / f"seed{seed}" / "models").mkdir(parents=True)
        torch.save(create_model("diht-tiny-vit")[0].state_dict(), tmp_path / run / f"seed{seed}" / "models" / "model.pt")
    embedding_geometry.main([str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(tmp_path / "data"),
                             "--batch-size", "8", "--batches", "2", "--out", str(tmp_path / "g.json")])
    got = json.loads((tmp_path / "g.json").read_text())
    assert len(got) == 3 and all(set(embedding_geometry.COLUMNS) <= set(m) for m in got.values())
    assert all(0 <= m["hn_pulled_share"] <= 1 and -1 <= m["role_swap_cos"] <= 1 for m in got.values())
    out = capsys.readouterr().out
    assert "| a | 2 |" in out and "| b | 1 |" in out
    with pytest.raises(SystemExit, match="no seed<k>/models/model.pt"):
        embedding_geometry.main([str(tmp_path / "data"), "--data", str(tmp_path / "data")])


def test_best_logit_scale_is_where_infonce_is_lowest(monkeypatch):
    """Cosines 0.5 on the diagonal, 0 elsewhere: sharper is always better, the clamp (100). Add to each row one
    confusing caption at 0.6: the loss per row is log(1 + e^(0.1 s) + (n-2) e^(-0.5 s)), lowest at
    s = ln(5 (n-2)) / 0.6 (both directions alike), which the tool finds on its grid."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    from embedding_geometry import best_logit_scale

    n = 32
    separated = 0.5 * torch.eye(n)
    assert best_logit_scale([separated]) == pytest.approx(100.0)
    confused = separated + 0.6 * torch.roll(torch.eye(n), 1, dims=1)
    assert best_logit_scale([confused, confused]) == pytest.approx(math.log(5 * (n - 2)) / 0.6, rel=0.02)


def _two_shape(relation, subject, obj, third=None):
    shapes = [{"shape": s, "colour": c, "size": "small"} for s, c in (subject, obj, *([third] if third else []))]
    return {"shapes": shapes, "relation": {"type": relation, "subject": 0, "object": 1}}


def test_swap_families_hold_the_same_words_with_roles_or_colours_swapped():
    red_circle_chases_blue_square = swap_family(_two_shape("chases", ("circle", "red"), ("square", "blue")))
    assert swap_family(_two_shape("chases", ("square", "blue"), ("circle", "red"))) == red_circle_chases_blue_square
    assert swap_family(_two_shape("chases", ("circle", "blue"), ("square", "red"))) == red_circle_chases_blue_square
    assert swap_family(_two_shape("touches", ("circle", "red"), ("square", "blue"))) != red_circle_chases_blue_square
    assert swap_family(_two_shape("chases", ("circle", "red"), ("star", "blue"))) != red_circle_chases_blue_square
    assert swap_family(_two_shape("chases", ("circle", "red"), ("square", "blue"), ("star", "green"))) \
        != red_circle_chases_blue_square
    assert swap_family({"shapes": [{"shape": "circle", "colour": "red", "size": "small"}], "relation": None}) is None
    assert swap_family(None) is None and swap_family({"caption": "x"}) is None


def test_swap_family_batches_hold_whole_families(tmp_path):
    """batch_sampler swap_families: every image once an epoch, a family's images one after another, a pure
    function of the seed; on the synthetic world's scenes a batch holds many times the hard negatives of a random
    one."""
    from diht_core.data.scenes import sample_scene as scene
    from diht_core.train.data import SwapFamilyOrder

    rng = np.random.default_rng(0)
    metas = [{**scene(rng).to_json()} for _ in range(600)]
    fams = {}
    ids = [NO_SCENE if swap_family(m) is None else fams.setdefault(swap_family(m), len(fams)) for m in metas]
    scenes = rng.integers(0, 40, size=len(metas)).tolist()  # made-up scene ids: many repeat in a family
    n, b = len(ids), 64
    order = SwapFamilyOrder(ids, scenes, seed=4)
    for epoch in range(2):
        perm = order(epoch)
        assert sorted(perm) == list(range(n))
        first, seen = {}, set()  # the places of each family's images with a scene new to it, in the order they come
        for k, i in enumerate(perm):
            if ids[i] != NO_SCENE and (ids[i], scenes[i]) not in seen:
                seen.add((ids[i], scenes[i]))
                first.setdefault(ids[i], []).append(k)
        assert all(ks == list(range(ks[0], ks[0] + len(ks))) for ks in first.values())  # one after another
    assert order(1) != order(0) and SwapFamilyOrder(ids, scenes, seed=4)(1) == order(1)

    def pairs(batches, same_scene):
        return sum(sum(1 for x in bt for y in bt if x != y and ids[x] == ids[y] != NO_SCENE
                       and (scenes[x] == scenes[y]) == same_scene) for bt in batches)

    steps = n // b
    grouped = [batch_indices(s, n, b, 4, order).tolist() for s in range(steps)]
    plain = [batch_indices(s, n, b, 4).tolist() for s in range(steps)]
    assert pairs(grouped, same_scene=False) > 5 * pairs(plain, same_scene=False)  # hard negatives
    # spread over the epoch, not packed at its start (where the families' first images are)
    third = steps // 3
    assert pairs(grouped[-third:], same_scene=False) > pairs(grouped[:third], same_scene=False) / 2
    # a family's repeats of one scene (false negatives) are not grouped: about as many as in random batches
    assert pairs(grouped, same_scene=True) <= 2 * pairs(plain, same_scene=True) + 4
    with pytest.raises(ValueError, match="swap_families found no image in a swap family"):
        SwapFamilyOrder([NO_SCENE] * 4, [0, 1, 2, 3], seed=0)


def test_mechanisms_block_keeps_steps_aligned():
    history = [{"step": 1, "loss": 1.0},
               {"step": 2, "mechanisms/fff_mining/recall": 0.0, "mechanisms/fff_mining/true_pairs": 2.0,
                "mechanisms/fff_mining/mined_pairs": 0.0},
               {"step": 3, "mechanisms/fff_mining/precision": 0.5, "mechanisms/fff_mining/recall": 1.0}]
    block = mechanisms_block(history)
    assert list(block) == ["fff_mining"]
    assert block["fff_mining"]["steps"] == [2, 3]
    assert block["fff_mining"]["precision"] == [None, 0.5] and block["fff_mining"]["recall"] == [0.0, 1.0]
    assert mechanisms_block([{"step": 1, "loss": 1.0}]) == {}


def test_planted_fields_are_read_or_absent():
    assert scene_id({"scene_id": 7}) == 7 and scene_id({"scene_id": "3"}) == 3
    assert scene_id({}) == scene_id(None) == scene_id({"scene_id": None}) == NO_SCENE
    meta = {"shapes": [{"shape": "circle", "colour": "red", "size": "small"},
                       {"shape": "star", "colour": "blue", "size": "small"}], "omitted": ["small", "blue"]}
    assert planted_concepts(meta) == {"true": {"circle", "red", "small", "star", "blue"}, "omitted": {"small", "blue"}}
    assert planted_concepts({"shapes": meta["shapes"]}) is None and planted_concepts(None) is None


def test_omitted_concepts_precision_and_recall_by_hand():
    truth = [{"true": {"circle", "red", "small"}, "omitted": {"red", "small"}},  # caption: "a circle"
             {"true": {"star", "blue", "large"}, "omitted": {"large"}},        # caption: "a blue star"
             {"true": {"square", "green", "large"}, "omitted": set()}]         # caption names everything
    predicted = [{"circle": 0.6, "red": 0.5, "green": 0.3, "two": 0.2},  # red found, small missed, green false
                 {"star": 0.9, "blue": 0.6, "large": 0.4},                # large found
                 {"square": 1.0, "purple": 0.7}]                          # purple false
    m = omitted_concepts(zip(predicted, truth))
    # new predictions (not named by the caption, judgeable): {red, green}, {large}, {purple} -> 4, 2 of them true
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert (m["n_omitted"], m["n_predicted_new"], m["samples"], m["samples_with_omitted"]) == (3, 4, 3, 2)
    assert m["mean_probability_omitted"] == pytest.approx((0.5 + 0.0 + 0.4) / 3)
    assert m["mean_probability_absent"] == pytest.approx((0.3 + 0.7) / (3 * (len(CONCEPTS) - 3)))
    perfect = omitted_concepts([({c: 1.0 for c in t["true"]}, t) for t in truth])
    assert perfect["precision"] == perfect["recall"] == 1.0
    assert omitted_concepts([]) is None


def _train_shards(directory, n=16, scenes=True, omitted=True, noise=None):
    """n samples in 2 shards; with scene ids (pairs of images re-render one scene: scene i // 2) and `omitted`;
    with noise (a list of planted kinds), sample i's is noise[i % len(noise)]."""
    rng = np.random.default_rng(0)
    samples, shared = [], None
    for i in range(n):
        sc = sample_scene(rng, count=1) if i % 2 == 0 else shared
        shared = sc
        s = sc.shapes[0]
        meta = {"captions": [f"a {s.shape}", f"a {s.colour} {s.shape}"][: 1 + i % 2], **sc.to_json()}
        if scenes:
            meta["scene_id"] = i // 2
        if omitted:
            meta["omitted"] = [s.size] + ([s.colour] if i % 2 == 0 else [])
        if noise:
            meta["noise"] = noise[i % len(noise)]
        samples.append({"__key__": f"{i:09d}", "jpg": encode_jpg(render(sc, 64, rng)), "txt": meta["captions"][0],
                        "json": json.dumps(meta).encode()})
    write_shard(directory / "0.tar", samples[: n // 2])
    write_shard(directory / "1.tar", samples[n // 2:])
    return [s["__key__"] for s in samples]


def test_loaders_carry_scene_ids_without_changing_the_batches(tmp_path):
    _train_shards(tmp_path / "with")
    _train_shards(tmp_path / "without", scenes=False)
    model, _, tok = create_model("diht-tiny-vit")
    size, cfg = image_size(model), TrainParams(seed=0, steps=3, batch_size=5, workers=0)
    with_ids, without = (load_train_set(tmp_path / d, size, tok, MAX_PIXELS) for d in ("with", "without"))
    assert without.scene_ids is None and with_ids.scene_ids.tolist() == [i // 2 for i in range(16)]
    assert with_ids.family_ids.tolist() == [NO_SCENE] * 16  # one shape each: no swap family
    assert with_ids.digest() == without.digest()  # the ids are no training input
    for a, b in zip(with_ids.batches(cfg, 0), without.batches(cfg, 0)):
        assert "scene_id" not in b and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    for step, a in enumerate(with_ids.batches(cfg, 0)):
        assert a["scene_id"].dtype == torch.long
        assert a["scene_id"].tolist() == [i // 2 for i in batch_indices(step, 16, 5, 0).tolist()]
    streams = {d: list(make_loader(tmp_path / d, size, tok, 5, MAX_PIXELS, seed=1, cfg=cfg)) for d in ("with", "without")}
    for a, b in zip(streams["with"], streams["without"]):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
        assert a["scene_id"].tolist() == [int(k) // 2 for k in a["key"]]
        assert b["scene_id"].tolist() == [NO_SCENE] * len(b["key"])


def test_oracle_filter_leaves_out_exactly_the_planted_kinds_and_counts_them(tmp_path):
    """train.drop_planted: the pairs of those planted noise kinds are left out and counted as oracle_<kind>, the
    rest kept in order; data without planted noise are refused, not trained on unfiltered."""
    kinds = ["clean", "junk", "mismatched", "text_in_image"]
    keys = _train_shards(tmp_path / "noisy", noise=kinds)
    _train_shards(tmp_path / "plain")
    model, _, tok = create_model("diht-tiny-vit")
    size = image_size(model)
    all_ = load_train_set(tmp_path / "noisy", size, tok, MAX_PIXELS)
    assert all_.keys == keys and all_.skipped == 0
    kept = load_train_set(tmp_path / "noisy", size, tok, MAX_PIXELS, drop_planted=("junk", "text_in_image"))
    assert kept.keys == [k for i, k in enumerate(keys) if kinds[i % 4] in ("clean", "mismatched")]
    assert kept.faults.by_reason == {"oracle_junk": 4, "oracle_text_in_image": 4}
    assert len(kept) + kept.skipped == len(keys)  # every sample kept or counted
    i = keys.index(kept.keys[1])
    assert torch.equal(kept.images[1], all_.images[i])
    with pytest.raises(ValueError, match="drop_planted.*carries no planted noise kind"):
        load_train_set(tmp_path / "plain", size, tok, MAX_PIXELS, drop_planted=("junk",))
    with pytest.raises(ParamsError, match="train.*drop_planted needs loader: memory"):
        validate_params({"train": {"drop_planted": ["junk"], "loader": "webdataset"}})
    with pytest.raises(ParamsError, match="drop_planted"):
        validate_params({"train": {"drop_planted": ["clean"]}})
    with pytest.raises(ParamsError, match="drop_planted.*names a planted kind twice"):
        validate_params({"train": {"drop_planted": ["junk", "junk"]}})


def test_train_records_mechanisms_and_the_model_is_unchanged(tmp_path):
    _train_shards(tmp_path / "with")
    _train_shards(tmp_path / "without", scenes=False)
    _, _, tok = create_model("diht-tiny-vit")
    size = image_size(create_model("diht-tiny-vit")[0])
    for loss, extra in (("hn-nce", {"hn_beta": 0.5}), ("sigmoid", {"fff_ii_threshold": 0.5})):
        kw = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "sigmoid" else {}
        cfg = TrainParams(seed=0, steps=3, batch_size=8, warmup_steps=1, log_every=1, loss=loss, **extra)
        states, logged = {}, {}
        for d in ("with", "without"):
            torch.manual_seed(0)
            model, _, _ = create_model("diht-tiny-vit", **kw)
            records = []
            out = train(model, load_train_set(tmp_path / d, size, tok, MAX_PIXELS), cfg, tmp_path / f"ck{d}{loss}",
                        log_fn=lambda step, rec: records.append(rec))
            states[d], logged[d] = model.state_dict(), (out, records)
        for k, v in states["with"].items():  # measuring changes nothing of the model
            assert torch.equal(v, states["without"][k]), (loss, k)
        out, records = logged["with"]
        block = mechanisms_block(out["history"])
        name = "hn_true_negative_weight_share" if loss == "hn-nce" else "fff_mining"
        assert list(block) == [name] and block[name]["steps"] == [1, 2, 3]
        assert all(any(k.startswith(f"mechanisms/{name}/") for k in r) for r in records)  # into the log (MLflow)
        if loss == "hn-nce":
            assert all(0 < v < 1 for v in block[name]["i2t"] + block[name]["t2i"])
        else:
            assert all(t > 0 for t in block[name]["true_pairs"])
        assert mechanisms_block(logged["without"][0]["history"]) == {}


def _params(tmp_path, data_dir):
    return Params.model_validate({
        "paths": {"data": str(data_dir), "models": str(tmp_path / "models"), "metrics": str(tmp_path / "metrics"),
                  "plots": str(tmp_path / "plots")},
        "train": {"seed": 0, "steps": 2, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "lambda_obj": 0,
                  "lambda_attr": 0, "hn_beta": 0.5}})


def test_train_stage_metrics_have_mechanisms_only_with_planted_truth(tmp_path):
    from diht_core.train.run import fit

    for d, planted in (("with", True), ("without", False)):
        data = tmp_path / d
        _train_shards(data / "filtered", scenes=planted)
        (data / "pseudo_labels").mkdir(parents=True)
        (data / "pseudo_labels" / "vocab_sizes.json").write_text('{"objects": 4, "attributes": 4}')
        metrics = fit(_params(tmp_path / f"out_{d}", data), tmp_path / f"ck_{d}")
        assert ("mechanisms" in metrics) == planted
        if planted:
            share = metrics["mechanisms"]["hn_true_negative_weight_share"]
            assert share["steps"] == [1, 2] and len(share["i2t"]) == len(share["t2i"]) == 2
            json.dumps(metrics["mechanisms"])  # plain JSON
        csv = (tmp_path / f"out_{d}" / "plots" / "train_loss.csv").read_text().splitlines()[0]
        assert "mechanisms" not in csv


def test_omitted_concept_metrics_join_pseudo_labels_by_key(tmp_path):
    keys = _train_shards(tmp_path / "filtered")
    planted = read_planted_concepts(tmp_path / "filtered")
    assert len(planted) == 16 and planted[keys[0]]["omitted"] <= planted[keys[0]]["true"]
    names = {"objects": ["circle", "square", "triangle", "star"],
             "attributes": ["red", "green", "blue", "yellow", "purple", "orange", "small", "large"]}
    (tmp_path / "features").mkdir()
    np.savez(tmp_path / "features" / "0.npz", keys=np.array(keys))
    # a teacher that names each image's true concepts (top-2 attributes: its colour and size) gets everything right
    truth = [planted[k]["true"] for k in keys]
    obj = np.array([[names["objects"].index(next(c for c in t if c in names["objects"]))] for t in truth], np.int32)
    attr = np.array([sorted(names["attributes"].index(c) for c in t if c in names["attributes"]) for t in truth],
                    np.int32)
    save_shard(tmp_path / "pl" / "0.npz", keys, (obj, np.ones(obj.shape, np.float16)),
               (attr, np.full(attr.shape, 0.5, np.float16)))
    assert dict(predicted_concepts(names, tmp_path / "features", tmp_path / "pl"))[keys[0]] == {
        c: (1.0 if c in names["objects"] else 0.5) for c in truth[0]}
    m = omitted_concept_metrics(names, tmp_path / "features", tmp_path / "pl", planted)
    assert m["precision"] == m["recall"] == 1.0 and m["n_omitted"] == 16 + 8
    # a teacher that always says "purple, small": right on the sizes it hits only
    wrong = np.tile([[4, 6]], (16, 1)).astype(np.int32)
    save_shard(tmp_path / "pl" / "0.npz", keys, (obj, np.ones(obj.shape, np.float16)),
               (wrong, np.full(wrong.shape, 0.5, np.float16)))
    m = omitted_concept_metrics(names, tmp_path / "features", tmp_path / "pl", planted)
    said = {"purple", "small"}
    hits = sum(len(said & planted[k]["omitted"]) for k in keys)  # small when small, purple when purple and omitted
    new = sum(len(said - (planted[k]["true"] - planted[k]["omitted"])) for k in keys)  # not named by the caption
    assert 0 < hits < new < 32
    assert m["recall"] == pytest.approx(hits / 24) and m["precision"] == pytest.approx(hits / new)
    assert omitted_concept_metrics(names, tmp_path / "features", tmp_path / "pl", {}) is None


@pytest.mark.slow  # torchrun's start: ~40 s on 2 shared cores
def test_two_ranks_measure_what_one_process_measures(tmp_path):
    """Each rank judges its rows against the gathered batch; the counts are summed over ranks."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from helpers.dist_mechanisms import measured

    helper = ROOT / "tests" / "helpers" / "dist_mechanisms.py"

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(helper),
           str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = json.loads((tmp_path / "two.json").read_text()), measured(ONE)
    assert set(two) == set(one) and len(one) == 7
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-6), k
    assert 0 < one["mechanisms/fff_mining/precision"] < 1 and one["mechanisms/fff_mining/recall"] == 1.0
