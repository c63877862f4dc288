"""The synthetic world's premises (download.world): each knob's planted truth, read back from the written shards,
matches the knob, and is gone with the knob off; the compositional evaluation task."""

import json
import re
from collections import Counter

import pandas as pd
import pytest
import torch

from diht_core.cat.quality import cat_quality
from diht_core.cat.report import cat_metrics
from diht_core.cat.shards import filter_shard, merge_decisions
from diht_core.config import (BenchmarkParams, CatFilterParams, DownloadParams, EvalSplitParams, NoiseParams,
                              WorldParams)
from diht_core.data.captions import JUNK, VERB_FORMS
from diht_core.data.scenes import COLOURS, SHAPES, SIZES, Scene, Shape, side_of
from diht_core.data.scenes import description as description_of
from diht_core.data.shards import read_samples, shard_paths
from diht_core.data.synthetic import teacher_samples, train_samples, write_source
from diht_core.eval.registry import default_tasks, get_task
from diht_core.eval.runner import run_task, score
from diht_core.models import create_model

SEED = 5
N = 600
D = DownloadParams(num_train=N, shard_size=200, image_size=64, teacher_samples=40,
                   noise=NoiseParams(junk=0.35, text_in_image=0.1, mismatched=0.05),
                   eval=EvalSplitParams(per_class=2, retrieval_images=20, vqa_questions=10, fewshot_per_class=1,
                                        compositional_items=200))
WEB = WorldParams()  # the defaults: every premise on
OFF = WorldParams(junk_style="templates", omit_prob=0.0, diverse_captions=False, same_scene_rate=0.0)
CONCEPTS = set(SHAPES) | set(COLOURS) | set(SIZES)


def read_back(root):
    return [s for shard in shard_paths(root / "raw" / "train") for s in read_samples(shard)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """{name: (download summary, train samples read back, data root)} of the web-like world and its control."""
    out = {}
    for name, w in (("web", WEB), ("off", OFF)):
        root = tmp_path_factory.mktemp(name)
        summary = write_source(D.model_copy(update={"world": w}), SEED, root)
        out[name] = (summary, read_back(root), root)
    return out


def words(text: str) -> set[str]:
    """The text's words, plurals also as their singular."""
    ws = re.findall(r"[a-z]+", text.lower())
    return set(ws) | {w[:-1] for w in ws if w.endswith("s")}


def shown(meta: dict) -> set[str]:
    return {w for s in meta["shapes"] for w in (s["shape"], s["colour"], s["size"])}


def test_defaults_are_the_web_like_world():
    assert DownloadParams().world == WEB
    assert (WEB.uninformative, WEB.junk_style, WEB.diverse_captions) == (True, "diverse", True)
    assert WEB.omit_prob > 0 and WEB.same_scene_rate > 0 and WEB.teacher_label_noise == 0
    assert abs(sum(WEB.junk_mix.model_dump().values()) - 1) < 1e-9


def test_diverse_junk_in_its_planted_shares(worlds):
    summary, samples, _ = worlds["web"]
    junk = [s["json"] for s in samples if s["json"]["noise"] == "junk"]
    assert len(junk) == round(0.35 * N) >= 200
    kinds = Counter(m["junk_kind"] for m in junk)
    for kind, share in WEB.junk_mix.model_dump().items():
        assert abs(kinds[kind] - share * len(junk)) <= 1, kind
        assert summary["world"]["junk_kind_fraction"][kind] == pytest.approx(kinds[kind] / len(junk))
    captions = [m["caption"] for m in junk]
    assert len(set(captions)) / len(captions) >= 0.8
    assert len({re.sub(r"\d+", "#", c) for c in captions}) / len(captions) >= 0.6  # not numbers in a few templates
    for m in junk:
        named = words(m["caption"]) & CONCEPTS
        if m["junk_kind"] == "painted_text_only":
            assert m["painted_text"] and m["caption"] == m["painted_text"]
        elif m["junk_kind"] == "product_listing":  # names a colour and a shape, none of them shown
            assert named & set(COLOURS) and named & set(SHAPES) and not named & shown(m)
        elif m["junk_kind"] == "noun_phrase":  # no verb of the grammar, only what is shown
            assert named <= shown(m) and named & set(SHAPES)
            assert not any(v in m["caption"] for forms in VERB_FORMS.values() for v in forms)
    assert all(s["json"]["junk_kind"] is None for s in samples if s["json"]["noise"] != "junk")


def test_template_junk_is_a_handful_of_boilerplates(worlds):
    junk = [s["json"] for s in worlds["off"][1] if s["json"]["noise"] == "junk"]
    assert {m["junk_kind"] for m in junk} == {"template"}
    stems = {re.sub(r"\d+", "#", m["caption"]) for m in junk}
    assert len(stems) <= len(JUNK)


def test_cat_reports_what_it_drops_of_each_junk_kind(worlds, tmp_path):
    """The caption rules (spotting off) drop most diverse junk and little clean; the report says so per kind."""
    root = worlds["web"][2]
    shard = shard_paths(root / "raw" / "train")[0]
    filter_shard(shard, tmp_path / "0.tar", tmp_path / "0.parquet", CatFilterParams(text_spotting=False), 10**8)
    df = merge_decisions([tmp_path / "0.parquet"], tmp_path / "decisions.parquet")
    by_kind = cat_metrics(df)["reasons_by_planted_kind"]
    assert {f"junk/{k}" for k in WEB.junk_mix.model_dump()} | {"clean"} <= set(by_kind)
    assert by_kind["clean"]["kept"] > 0.9
    for kind in ("noun_phrase", "product_listing"):
        assert by_kind[f"junk/{kind}"].get("kept", 0) < 0.5, kind


def test_spotting_the_painted_text_of_junk_is_a_true_positive():
    df = pd.DataFrame({"caption": ["a red star sits on the left", "summer vibes", "a blue circle holds a star"],
                       "noise": ["text_in_image", "junk", "clean"], "junk_kind": [None, "painted_text_only", None],
                       "reason": ["text_spotted", "text_spotted", "kept"], "kept": [False, False, True],
                       "has_action": [True, False, True], "objects": [["star"], [], ["circle", "star"]],
                       "attributes": [["red"], [], ["blue"]]})
    assert cat_quality(df)["spotter"] == {"precision": 1.0, "recall": 1.0, "support": 2}


def test_no_uninformative_pairs_when_off():
    d = D.model_copy(update={"num_train": 60, "world": WorldParams(uninformative=False)})
    metas = [json.loads(s["json"]) for s in train_samples(d, SEED)]
    assert {m["noise"] for m in metas} == {"clean"} and all(m["painted_text"] is None for m in metas)


def test_omitted_concepts_are_shown_and_unnamed(worlds):
    summary, samples, _ = worlds["web"]
    attribute_draws = attribute_omitted = 0
    for s in samples:
        m = s["json"]
        named = set().union(*(words(c) for c in m["captions"])) & CONCEPTS
        assert set(m["omitted"]) == shown(m) - named
        if m["noise"] == "clean" and m["count"] == 1 and len(m["captions"]) == 1:  # one caption, two draws
            attribute_draws += 2
            attribute_omitted += len(set(m["omitted"]) - set(SHAPES))
    assert attribute_draws >= 100
    assert abs(attribute_omitted / attribute_draws - WEB.omit_prob) < 0.12
    own = [s["json"] for s in samples if s["json"]["noise"] in ("clean", "text_in_image")]
    share = sum(bool(m["omitted"]) for m in own) / len(own)
    assert summary["world"]["omitted_any"] == pytest.approx(share) and share > 0.3


def test_captions_name_every_concept_with_omit_prob_zero(worlds):
    samples = worlds["off"][1]
    own = [s["json"] for s in samples if s["json"]["noise"] in ("clean", "text_in_image")]
    assert own and all(m["omitted"] == [] for m in own)
    junk = [s["json"] for s in samples if s["json"]["noise"] == "junk"]
    assert all(set(m["omitted"]) == shown(m) for m in junk)  # boilerplate names nothing shown


def description(m: dict) -> tuple:
    rel = m["relation"]["type"] if m["relation"] else None
    sides = tuple(side_of(Shape(**s)) for s in m["shapes"])
    return tuple((s["shape"], s["colour"], s["size"]) for s in m["shapes"]), rel, sides


def test_same_scene_pairs_share_description_and_captions(worlds):
    summary, samples, _ = worlds["web"]
    groups: dict[int, list] = {}
    for s in samples:
        groups.setdefault(s["json"]["scene_id"], []).append(s)
    by_key = {int(s["json"]["key"]): s for s in samples}
    copies = [s for s in samples if s["json"]["copy_of"] is not None]
    assert len(copies) == round(WEB.same_scene_rate * N)
    assert summary["world"]["same_scene_copies"] == pytest.approx(len(copies) / N)
    for other in copies:  # a re-render: its original's description and captions, new pixels and positions
        m, first = other["json"], by_key[other["json"]["copy_of"]]["json"]
        original = by_key[other["json"]["copy_of"]]
        assert m["noise"] == "clean" and first["noise"] == "clean"
        assert m["captions"] == first["captions"] and m["scene_id"] == first["scene_id"]
        assert description(m) == description(first)
        assert other["image_bytes"] != original["image_bytes"]
        assert [(s["x"], s["y"]) for s in m["shapes"]] != [(s["x"], s["y"]) for s in first["shapes"]]
    for scene_id, group in groups.items():  # one id per description: re-renders and descriptions drawn alike
        assert int(group[0]["json"]["key"]) == scene_id  # the first of a group names it
        assert len({canonical(s["json"]) for s in group}) == 1
    assert len({canonical(s["json"]) for s in samples}) == len(groups)  # and one description per id
    assert all(s["json"]["copy_of"] is None for s in worlds["off"][1])


def canonical(m: dict) -> tuple:
    """scenes.description of a sample's json."""
    return description_of(Scene([Shape(**s) for s in m["shapes"]], m["relation"]))


def shared_caption_rate(samples) -> float:
    """The share of clean pairs whose caption is also that of a pair of another scene."""
    clean = [s["json"] for s in samples if s["json"]["noise"] == "clean"]
    scenes = {}
    for m in clean:
        scenes.setdefault(m["caption"], set()).add(m["scene_id"])
    return sum(len(scenes[m["caption"]]) > 1 for m in clean) / len(clean)


def test_diverse_captions_rarely_shared(worlds):
    web, off = shared_caption_rate(worlds["web"][1]), shared_caption_rate(worlds["off"][1])
    assert web < 0.1 < 0.3 < off
    assert worlds["web"][0]["world"]["shared_caption"] == pytest.approx(web)
    assert worlds["off"][0]["world"]["shared_caption"] == pytest.approx(off)


def test_teacher_label_noise_replaces_that_share_of_labels():
    d = D.model_copy(update={"world": WorldParams(teacher_label_noise=0.5)})
    noisy = [json.loads(s["json"]) for s in teacher_samples(d, SEED)]
    clean = [json.loads(s["json"]) for s in teacher_samples(D, SEED)]
    assert sum(m["label_noise"] for m in noisy) == round(0.5 * d.teacher_samples)
    assert not any(m["label_noise"] for m in clean)
    for a, b in zip(noisy, clean):
        assert {k: a[k] for k in ("shapes", "relation")} == {k: b[k] for k in ("shapes", "relation")}  # same images
        assert b["labels"] == a.get("true_labels", a["labels"])
    changed = [m for m in noisy if m["label_noise"] and m["labels"] != m["true_labels"]]
    assert len(changed) >= 0.8 * sum(m["label_noise"] for m in noisy)


def test_eval_splits_stay_clean(worlds):
    """The world knobs shape the training pairs only: the eval splits are the same in both worlds, and the
    retrieval captions name every concept."""
    web_root, off_root = worlds["web"][2], worlds["off"][2]
    for task in ("synthetic_retrieval", "synthetic_compositional", "synthetic_shape"):
        web = list(read_samples(web_root / "eval" / task / "test" / "0.tar"))
        off = list(read_samples(off_root / "eval" / task / "test" / "0.tar"))
        assert [(s["json"], s.get("txt"), s["image_bytes"]) for s in web] == \
               [(s["json"], s.get("txt"), s["image_bytes"]) for s in off], task
    for s in read_samples(web_root / "eval" / "synthetic_retrieval" / "test" / "0.tar"):
        named = set().union(*(words(c) for c in s["txt"].split("\n"))) & CONCEPTS
        assert named == shown(s["json"])


def parse_statement(text: str) -> tuple:
    """(subject colour, subject shape, relation, object colour, object shape) of a compositional statement."""
    for rel, forms in VERB_FORMS.items():
        for form, verb in sorted(enumerate(forms), key=lambda fv: -len(fv[1])):
            if f" {verb} " in f" {text} ":
                left, right = (re.sub(r"^an? ", "", p.strip()).split() for p in text.split(f" {verb} "))
                subject, obj = (right, left) if form == 3 else (left, right)
                return subject[0], subject[1], rel, obj[0], obj[1]
    raise ValueError(text)


def scene_truth(m: dict) -> tuple:
    a, b = (m["shapes"][m["relation"][k]] for k in ("subject", "object"))
    return a["colour"], a["shape"], m["relation"]["type"], b["colour"], b["shape"]


def compositional_items(root) -> list[dict]:
    return [s["json"] for s in read_samples(root / "eval" / "synthetic_compositional" / "test" / "0.tar")]


def test_compositional_split_swaps_roles_or_colours(worlds):
    items = compositional_items(worlds["web"][2])
    assert len(items) == D.eval.compositional_items
    assert Counter(m["qtype"] for m in items).keys() == {"role_swap", "colour_swap"}
    assert 0.35 < sum(m["label"] for m in items) / len(items) < 0.65  # the true caption's position is random
    for m in items:
        true, wrong = m["statements"][m["label"]], m["statements"][1 - m["label"]]
        assert true != wrong and len(m["statements"]) == 2 and m["answers"] == m["statements"]
        bag = lambda t: sorted(w for w in t.split() if w not in ("a", "an"))  # noqa: E731
        assert bag(true) == bag(wrong)  # the same words
        assert parse_statement(true) == scene_truth(m)
        c1, s1, rel, c2, s2 = scene_truth(m)
        swapped = (c2, s2, rel, c1, s1) if m["qtype"] == "role_swap" else (c2, s1, rel, c1, s2)
        assert parse_statement(wrong) == swapped != scene_truth(m)
        assert not (rel == "touches" and (m["qtype"] == "role_swap" or s1 == s2))  # a touch is symmetric


def one_hot(keys: list[tuple], index: dict) -> torch.Tensor:
    out = torch.zeros(len(keys), 4096)
    for i, k in enumerate(keys):
        out[i, index.setdefault(k, len(index))] = 1.0
    return out


def test_compositional_benchmark_scores_chance_and_a_perfect_reader(worlds):
    root = worlds["web"][2]
    assert "synthetic_compositional" in default_tasks() and "synthetic_compositional" in BenchmarkParams().tasks
    spec = get_task("synthetic_compositional")
    items = compositional_items(root)
    index: dict = {}
    img = one_hot([scene_truth(m) for m in items], index)  # an oracle that reads the scene off the image ...
    encode = lambda texts: one_hot([parse_statement(t) for t in texts], index)  # noqa: E731  ... and the caption
    data = {"statements": [m["statements"] for m in items], "labels": torch.tensor([m["label"] for m in items]),
            "qtypes": [m["qtype"] for m in items], "answers": [m["answers"] for m in items]}
    metrics, chance = score(spec, img, encode, data)
    assert metrics["accuracy"] == 1.0 and chance == 0.5
    assert metrics["accuracy/role_swap"] == metrics["accuracy/colour_swap"] == 1.0
    bag_encode = lambda texts: one_hot([tuple(sorted(t.split())) for t in texts], index)  # noqa: E731  word order lost
    blind, _ = score(spec, img, bag_encode, data)
    assert blind["accuracy"] < 0.7

    torch.manual_seed(0)
    model, preprocess, tok = create_model("diht-tiny-vit")
    r = run_task("synthetic_compositional", model, preprocess, tok, root)
    assert r["chance"] == 0.5 and 0.3 < r["main"] == r["accuracy"] < 0.7
