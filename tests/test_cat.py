import json

import numpy as np
import pandas as pd
import pytest

from diht_core.cat import caption_text_match, decide, parse_caption, parse_captions, spot_text
from diht_core.cat.shards import filter_shard
from diht_core.config import CatFilterParams
from diht_core.data.scenes import render, sample_scene
from diht_core.data.shards import encode_jpg, write_shard


@pytest.mark.parametrize("text, complexity", [
    ("A black cat is chasing a small brown bird", 3),   # the paper's examples
    ("The quarterback kicked the small brown football", 3),
    ("a small red circle chases a large blue square", 3),
    ("a red circle", 1),
    ("", 0),
])
def test_complexity(text, complexity):
    assert parse_caption(text).complexity == complexity


def test_objects_attributes_actions():
    p = parse_caption("A black cat is chasing a small brown bird")
    assert set(p.objects) == {"cat", "bird"}
    assert ("bird", "small") in p.attributes and ("cat", "black") in p.attributes
    assert p.actions == (("cat", "chase", "bird"),) and p.has_action


def test_passive_and_participles_count_as_actions():
    assert ("cat", "chase", "bird") in parse_caption("a bird chased by a cat").actions
    (subj, _verb, obj), = parse_caption("a man riding a horse").actions  # spaCy's sm lemma may be "rid"
    assert (subj, obj) == ("man", "horse")


def test_compounds_and_predicates():
    p = parse_caption("the stop sign is red")
    assert "stop sign" in p.objects
    assert ("stop sign", "red") in p.attributes


def test_boilerplate_has_no_action():
    for text in ("premium quality wall sticker 60x90 cm", "stock photo id 12345", "free shipping on all orders"):
        assert not parse_caption(text).has_action


@pytest.mark.parametrize("bad", ["", "   ", "x" * 10_000, b"\xff\xfe\x00bad", None, "日本語のキャプション", "🙂🙂🙂"])
def test_bad_input_gets_a_defined_result(bad):
    p = parse_captions([bad])[0]
    assert p.complexity >= 0 and isinstance(p.has_action, bool)


def test_batched_equals_single():
    texts = ["a red circle chases a blue star", "a dog", "two cats sleeping on a sofa"]
    assert parse_captions(texts) == [parse_caption(t) for t in texts]


def test_caption_text_match_rule():
    cap = "a purple circle resting on the bottom"
    assert caption_text_match([("PURPLE CIRCLE", 0.95)], cap)
    assert caption_text_match([("xxPurPlecirc", 0.9)], cap)          # case and whitespace ignored
    assert not caption_text_match([("PURPLE CIRCLE", 0.5)], cap)     # low confidence
    assert not caption_text_match([("PURP", 0.99)], cap)             # 4 < 5 characters
    assert caption_text_match([("PURP", 0.99)], cap, CatFilterParams(min_chars=4))
    assert not caption_text_match([("GREEN STAR", 0.99)], cap)
    assert not caption_text_match([], cap)


def test_decide_order():
    p = parse_caption("a red circle chases a blue star")
    assert decide(p, []).kept
    d = decide(p, [("RED CIRCLE", 0.99)])
    assert not d.kept and d.reason == "text_spotted" and d.matched == "redci"
    assert decide(parse_caption("stock photo id 12345"), None).reason == "no_action"
    assert decide(parse_caption("a red circle"), None, CatFilterParams(min_complexity=2)).reason == "low_complexity"
    assert decide(parse_caption("stock photo"), None, CatFilterParams(require_action=False)).kept


def test_rapidocr_spots_painted_caption_words():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, count=1)
    scene.painted_text = "green square"
    spotted = spot_text(render(scene, 128, rng))
    assert caption_text_match(spotted, "a green square sits on the left")
    scene.painted_text = None
    assert not caption_text_match(spot_text(render(scene, 128, rng)), "a green square sits on the left")


def _shard(tmp_path, name="0.tar"):
    rng = np.random.default_rng(0)
    samples = []
    specs = [("a red circle chases a blue star", None), ("stock photo id 4412", None),
             ("a green square sits on the left", "green square"), ("a blue star touches a red circle", None)]
    for i, (cap, painted) in enumerate(specs):
        scene = sample_scene(rng, count=1)
        scene.painted_text = painted
        samples.append({"__key__": f"{i:09d}", "jpg": encode_jpg(render(scene, 128, rng)), "txt": cap,
                        "json": json.dumps({"noise": "x"}).encode()})
    samples.append({"__key__": "000000009", "jpg": b"not a jpeg", "txt": "a cat chases a dog",
                    "json": b"{}"})
    path = tmp_path / name
    write_shard(path, samples)
    return path


def test_filter_shard_decisions_and_resume(tmp_path):
    src = _shard(tmp_path)
    out_tar, out_pq = tmp_path / "out" / "0.tar", tmp_path / "dec" / "0.parquet"
    counts = filter_shard(src, out_tar, out_pq, CatFilterParams(), 10**8)
    df = pd.read_parquet(out_pq)
    assert df.reason.tolist() == ["kept", "no_action", "text_spotted", "kept", "bad_image"]
    assert counts == {"in": 5, "kept": 2, "no_action": 1, "text_spotted": 1, "bad_image": 1}
    assert list(df.columns[:4]) == ["key", "caption", "noise", "complexity"]
    from diht_core.data.shards import read_samples
    assert [s["key"] for s in read_samples(out_tar)] == ["000000000", "000000003"]
    # done shards are skipped; a changed config redoes the shard
    assert filter_shard(src, out_tar, out_pq, CatFilterParams(), 10**8) == {"skipped_done": 1}
    assert "skipped_done" not in filter_shard(src, out_tar, out_pq, CatFilterParams(require_action=False), 10**8)
    assert pd.read_parquet(out_pq).reason.tolist()[1] == "kept"
    # a truncated parquet (killed run) is redone
    out_pq.write_bytes(out_pq.read_bytes()[:50])
    assert "skipped_done" not in filter_shard(src, out_tar, out_pq, CatFilterParams(), 10**8)


def test_doctr_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    from diht_core.cat.spotting import DocTRSpotter

    monkeypatch.setenv("DOCTR_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="docTR weights not found"):
        DocTRSpotter()


def test_doctr_loads_local_weights_in_its_cache_layout(monkeypatch, tmp_path):
    """Weights we make ourselves, in docTR's cache layout, load and run (no download)."""
    import torch
    from doctr.models import detection, recognition

    from diht_core.cat.spotting import DocTRSpotter

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    det = detection.db_mobilenet_v3_large(pretrained=False, pretrained_backbone=False)
    reco = recognition.crnn_mobilenet_v3_small(pretrained=False, pretrained_backbone=False)
    torch.save(det.state_dict(), tmp_path / "models" / "db_mobilenet_v3_large-21748dd0.pt")
    torch.save(reco.state_dict(), tmp_path / "models" / "crnn_mobilenet_v3_small-3b6e7a5f.pt")
    monkeypatch.setenv("DOCTR_CACHE_DIR", str(tmp_path))
    spotter = DocTRSpotter(det_arch="db_mobilenet_v3_large", reco_arch="crnn_mobilenet_v3_small")
    rng = np.random.default_rng(0)
    out = spotter(render(sample_scene(rng, count=1), 128, rng))
    assert isinstance(out, list) and all(isinstance(t, str) and 0 <= c <= 1 for t, c in out)


def test_quality_against_planted_truth():
    from diht_core.cat.quality import cat_quality

    df = pd.DataFrame([
        {"caption": "a red circle chases a blue star", "noise": "clean", "objects": ["circle", "star"],
         "attributes": ["red", "blue"], "has_action": True, "reason": "kept", "kept": True},
        {"caption": "a green square holds a star", "noise": "text_in_image", "objects": ["square", "star"],
         "attributes": ["green"], "has_action": True, "reason": "text_spotted", "kept": False},
        {"caption": "a red star touches a circle", "noise": "text_in_image", "objects": ["star", "circle"],
         "attributes": ["red"], "has_action": True, "reason": "kept", "kept": True},
        {"caption": "stock photo 12", "noise": "junk", "objects": ["stock photo"], "attributes": [],
         "has_action": False, "reason": "no_action", "kept": False},
    ])
    q = cat_quality(df)
    assert q["spotter"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert q["parser_action"]["precision"] == 1.0 and q["parser_action"]["recall"] == 1.0
    assert q["parser_objects"] == {"precision": 1.0, "recall": 1.0}
    assert q["filter_vs_planted_noise"]["recall"] == pytest.approx(2 / 3)
    assert cat_quality(df.assign(noise=None)) == {}
