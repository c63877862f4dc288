import json
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from diht_core.data.captions import VERB_FORMS
from diht_core.data.scenes import RELATIONS, render, sample_scene
from diht_core.data.shards import decode_image, read_samples, shard_paths
from diht_core.config import DownloadParams, EvalSplitParams
from diht_core.data.synthetic import CLASSIFICATION_TASKS, generate, train_samples

SEED = 3
D = DownloadParams(num_train=200, shard_size=64, image_size=96, teacher_samples=20,
                   eval=EvalSplitParams(per_class=4, retrieval_images=10, vqa_questions=12, fewshot_per_class=2))
CFG = SimpleNamespace(**D.model_dump(exclude={"noise", "eval", "url_list"}), **D.noise.model_dump(),
                      **D.eval.model_dump())  # flat view of D for the checks


def test_deterministic_from_seed():
    a = [s["jpg"] + s["json"] for s in train_samples(D, SEED)]
    b = [s["jpg"] + s["json"] for s in train_samples(D, SEED)]
    c = [s["jpg"] + s["json"] for s in train_samples(D, 4)]
    assert a == b
    assert a != c


def test_planted_noise_fractions_are_exact():
    metas = [json.loads(s["json"]) for s in train_samples(D, SEED)]
    kinds = Counter(m["noise"] for m in metas)
    assert kinds["junk"] == round(CFG.junk * CFG.num_train)
    assert kinds["text_in_image"] == round(CFG.text_in_image * CFG.num_train)
    assert kinds["mismatched"] == round(CFG.mismatched * CFG.num_train)
    multi = [m for m in metas if m["multi_caption"]]
    assert multi and all(m["noise"] == "clean" and len(set(m["captions"])) > 1 for m in multi)
    for m in metas:
        assert {"key", "caption", "captions", "noise", "shapes", "relation", "count"} <= set(m)
        assert m["caption"] == m["captions"][0]
        painted = m["noise"] == "text_in_image" or m["junk_kind"] == "painted_text_only"
        assert (m["painted_text"] is not None) == painted


def test_captions_describe_the_scene():
    for s in train_samples(D, SEED):
        m = json.loads(s["json"])
        if m["noise"] != "clean":
            continue
        for cap in m["captions"]:
            assert any(sh["shape"] in cap for sh in m["shapes"])
            if m["relation"]:
                assert any(form in cap for form in VERB_FORMS[m["relation"]["type"]])


@pytest.mark.parametrize("relation", RELATIONS)
def test_relations_are_visible_geometry(relation):
    rng = np.random.default_rng(0)
    for _ in range(20):
        sc = sample_scene(rng, count=2, relation=relation)
        a, b = sc.shapes
        d = math.hypot(a.x - b.x, a.y - b.y)
        if relation == "holds":
            assert d + b.r < a.r  # inside
        elif relation == "touches":
            assert d < a.r + b.r  # overlap
        else:
            assert d > a.r + b.r + 0.1  # apart, arrow between
    img = np.asarray(render(sc, 128, rng)).astype(int)
    assert img.std() > 10


def test_chase_arrow_is_drawn():
    rng = np.random.default_rng(1)
    sc = sample_scene(rng, count=2, relation="chases")
    a, b = sc.shapes
    img = np.asarray(render(sc, 128, rng)).astype(int)
    mx, my = int((a.x + b.x) / 2 * 128), int((a.y + b.y) / 2 * 128)
    patch = img[max(0, my - 3):my + 4, max(0, mx - 3):mx + 4]
    assert patch.sum(-1).min() < 150  # dark arrow pixels midway between the shapes


def test_generate_layout(tmp_path):
    stats = generate(D, SEED, tmp_path)
    assert stats["train"] == CFG.num_train
    assert len(shard_paths(tmp_path / "raw" / "train")) == math.ceil(CFG.num_train / CFG.shard_size)
    for task, spec in CLASSIFICATION_TASKS.items():
        base = tmp_path / "eval" / task
        assert (base / "classnames.txt").read_text().split("\n")[:-1] == spec["classnames"]
        assert "{c}" in (base / "zeroshot_classification_templates.txt").read_text()
        assert (base / "test" / "nshards.txt").read_text().strip() == "1"
        samples = list(read_samples(base / "test" / "0.tar"))
        assert len(samples) == CFG.per_class * len(spec["classnames"])
        assert Counter(s["cls"] for s in samples) == {c: CFG.per_class for c in range(len(spec["classnames"]))}
        decode_image(samples[0]["image_bytes"])
    ret = list(read_samples(tmp_path / "eval" / "synthetic_retrieval" / "test" / "0.tar"))
    assert all(len(s["txt"].split("\n")) == 2 for s in ret)
    vqa = list(read_samples(tmp_path / "eval" / "synthetic_vqa" / "test" / "0.tar"))
    assert all(0 <= s["json"]["label"] < len(s["json"]["answers"]) == len(s["json"]["statements"]) for s in vqa)


def test_eval_classes_match_images():
    from diht_core.data.synthetic import _classification_split

    for s in _classification_split("synthetic_count", 3, D, SEED, "test"):
        assert json.loads(s["json"])["count"] == int(s["cls"]) + 1
    for s in _classification_split("synthetic_shape", 3, D, SEED, "test"):
        assert json.loads(s["json"])["shapes"][0]["shape"] == CLASSIFICATION_TASKS["synthetic_shape"]["classnames"][int(s["cls"])]
