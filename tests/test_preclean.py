"""DiHT's LAION pre-cleaning: rows dropped from the list's columns before any request; image classifiers from
local weights on the downloaded images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diht_core.config import PrecleanParams, UrlListParams, validate_params
from diht_core.data.loopback import LoopbackServer
from diht_core.data.preclean import preclean, toxic_probability
from diht_core.data.shards import read_samples, shard_paths
from diht_core.data.url_download import download_source, download_url_list

from conftest import tiny_params

TOXIC = "fuck you, you stupid bitch"


def _rows(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)


def _download(lst, root, preclean_cfg: dict, **url_list) -> dict:
    raw = tiny_params()
    raw["download"].update(source="url_list", preclean={"enabled": True, **preclean_cfg})
    raw["download"]["url_list"].update(path=str(lst), timeout=2.0, threads=4, shard_size=4, **url_list)
    return download_source(validate_params(raw).download, 0, root)


def test_laion_list_drops_exactly_the_flagged_rows_without_a_request(tmp_path):
    rows = [  # (path, caption, NSFW, pwatermark, expected reason)
        ("/img/40x30/0.jpg", "a dog runs on the beach", "UNLIKELY", 0.10, "ok"),
        ("/img/40x30/1.jpg", "two people on a bed", "NSFW", 0.05, "nsfw"),
        ("/img/40x30/2.jpg", "a red car parked outside", "UNSURE", 0.93, "watermark"),
        ("/img/40x30/3.jpg", TOXIC, "UNLIKELY", 0.20, "toxic_caption"),
        ("/img/40x30/4.jpg", "a cat on a sofa", "UNLIKELY", None, "ok"),  # no watermark score: kept
        ("/img/40x30/5.jpg", "a bowl of soup", None, 0.50, "ok"),  # at the limit: kept
        ("/img/40x30/6.jpg", "shit, a sunset", "NSFW", 0.99, "nsfw"),  # several rules: the first
        ("/status/404", "a tree in a field", "UNLIKELY", 0.30, "http_404"),
        ("/img/40x30/8.jpg", "", "UNLIKELY", 0.01, "ok"),  # no caption: nothing to judge
    ]
    with LoopbackServer() as srv:
        lst = tmp_path / "part-00000.parquet"
        pd.DataFrame({"URL": [srv.url(r[0]) for r in rows], "TEXT": [r[1] for r in rows],
                      "NSFW": [r[2] for r in rows], "pwatermark": [r[3] for r in rows],
                      "WIDTH": [40] * len(rows)}).to_parquet(lst)
        m = _download(lst, tmp_path / "data", {}, url_col="URL", caption_col="TEXT", allow_private=True)
        requested = srv.requests
    expected = [r[4] for r in rows]
    out = tmp_path / "data" / "raw" / "train"
    got = _rows(out)
    assert got.reason.tolist() == expected
    assert got[got.reason != "ok"].status.eq("failed").all()
    assert sorted(requested) == sorted(r[0] for r in rows if r[4] in ("ok", "http_404"))  # none for dropped rows
    msgs = dict(zip(got.reason, got.error_message))
    assert msgs["nsfw"] == "NSFW = NSFW" and msgs["watermark"] == "pwatermark = 0.93 > 0.5"
    assert msgs["toxic_caption"].startswith("alt-profanity-check p = ")
    assert [s["txt"] for shard in shard_paths(out) for s in read_samples(shard)] == [
        r[1] for r in rows if r[4] == "ok"]
    assert m["reasons"] == {"ok": 4, "nsfw": 2, "watermark": 1, "toxic_caption": 1, "http_404": 1}
    assert m["preclean"] == {"dropped": {"nsfw": 2, "watermark": 1, "toxic_caption": 1}, "not_applied": {},
                             "image_classifiers": []}


def test_a_list_without_the_columns_says_the_rules_were_not_applied(tmp_path, capsys):
    with LoopbackServer() as srv:
        lst = tmp_path / "Train_GCC-training.tsv"  # CC3M: caption<TAB>url, no NSFW or watermark column
        lst.write_text(f"a dog runs\t{srv.url('/img/40x30/0.jpg')}\n{TOXIC}\t{srv.url('/img/40x30/1.jpg')}\n")
        m = _download(lst, tmp_path / "data", {})
        assert srv.requests == ["/img/40x30/0.jpg"]
    assert m["reasons"] == {"ok": 1, "toxic_caption": 1}
    assert m["preclean"]["not_applied"] == {
        "nsfw": "the list has no column 'NSFW' (download.preclean.nsfw_column)",
        "watermark": "the list has no column 'pwatermark' (download.preclean.watermark_column)"}
    log = capsys.readouterr().out
    assert "[preclean] rule nsfw NOT applied" in log and "[preclean] rule watermark NOT applied" in log


def test_rules_switched_off_and_a_changed_rule_redoes_the_shards(tmp_path):
    urls = pd.DataFrame({"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": [TOXIC, "a cat"],
                         "NSFW": ["NSFW", "UNLIKELY"]})
    off = PrecleanParams(enabled=True, nsfw_column=None, watermark_column=None, toxic_captions=False)
    out, report = preclean(urls, off)
    assert out.drop_reason.tolist() == ["", ""] and report["not_applied"] == {}
    out, report = preclean(urls.assign(caption=["", ""]), PrecleanParams(enabled=True))
    assert out.drop_reason.tolist() == ["nsfw", ""] and report["not_applied"] == {
        "watermark": "the list has no column 'pwatermark' (download.preclean.watermark_column)",
        "toxic_caption": "the list has no captions"}
    assert toxic_probability(["a dog on a beach", TOXIC]).round(1).tolist() == [0.1, 1.0]


def test_preclean_is_off_by_default_and_keeps_the_download_as_it_was(tmp_path):
    """Default params: no preclean key in the metrics, the same shard digest as before pre-cleaning existed."""
    from diht_core.data.url_download import shard_digest

    rows = pd.DataFrame({"url": ["http://a/1.jpg"], "caption": [TOXIC]})
    assert shard_digest(rows, 0, UrlListParams()) == "567e754d232449eac01e4302"  # main before pre-cleaning
    assert not validate_params(tiny_params()).download.preclean.enabled


def _flag(target: torch.Tensor, others: torch.Tensor, two_outputs: bool, k: float = 200.0) -> dict:
    """A head whose logit is k * (target . x - c), c halfway between target's self-similarity (1) and its
    nearest other image's: it flags exactly the target image (the test checks the margin)."""
    c = float((1 + (others @ target).max()) / 2)
    w = torch.stack([target, -target])  # a ReLU pair that passes z = target . x - c through
    state = {"0.weight": w, "0.bias": torch.tensor([-c, c])}
    if two_outputs:  # softmax over (negative, positive)
        state.update({"2.weight": torch.tensor([[0.0, 0.0], [k, -k]]), "2.bias": torch.zeros(2)})
    else:
        state.update({"2.weight": torch.tensor([[k, -k]]), "2.bias": torch.zeros(1)})
    return state


def test_image_classifiers_from_local_weights(tmp_path):
    import open_clip

    from diht_core.data.image_filter import ImageFilter, load_head
    from diht_core.models import register_configs

    register_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model("diht-tiny-vit")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    with LoopbackServer() as srv:
        urls = pd.DataFrame({"url": [srv.url(f"/img/64x48/{i}.jpg") for i in range(6)], "caption": ["c"] * 6})
        cfg = UrlListParams(timeout=2.0, threads=3, shard_size=3, image_size=48, allow_private=True)
        plain = download_url_list(urls, tmp_path / "plain", cfg, progress=False)
        assert plain["successes"] == 6
        jpgs = [s["image_bytes"] for shard in shard_paths(tmp_path / "plain") for s in read_samples(shard)]
        pre = PrecleanParams(enabled=True, clip_model="diht-tiny-vit", clip_weights=str(tmp_path / "clip.pt"))
        emb = ImageFilter.from_params(pre, device="cpu").embed(jpgs)
        assert (emb @ emb.T - torch.eye(6)).max() < 0.999  # six distinct embeddings: a margin to separate
        torch.save(_flag(emb[1], emb[[0, 2, 3, 4, 5]], two_outputs=False), tmp_path / "nsfw.pt")
        torch.save(_flag(emb[4], emb[[0, 1, 2, 3, 5]], two_outputs=True), tmp_path / "watermark.pt")
        pre = pre.model_copy(update={"nsfw_model": str(tmp_path / "nsfw.pt"),
                                     "watermark_model": str(tmp_path / "watermark.pt")})
        image_filter = ImageFilter.from_params(pre, device="cpu")
        probs = image_filter.probabilities(jpgs)
        assert (probs["nsfw"] > 0.5).tolist() == [False, True, False, False, False, False]
        assert (probs["watermark"] > 0.5).tolist() == [False, False, False, False, True, False]
        stats = download_url_list(urls, tmp_path / "filtered", cfg, progress=False, image_filter=image_filter)
    got = _rows(tmp_path / "filtered")
    assert got.reason.tolist() == ["ok", "nsfw", "ok", "ok", "watermark", "ok"]
    assert got.error_message[1].startswith("image classifier download.preclean.nsfw_model p = ")
    assert stats["reasons"] == {"ok": 4, "nsfw": 1, "watermark": 1}
    kept = [s["key"] for shard in shard_paths(tmp_path / "filtered") for s in read_samples(shard)]
    assert kept == [f"{i:09d}" for i in (0, 2, 3, 5)]
    torch.save({"0.weight": torch.zeros(1, 7), "0.bias": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="download.preclean.nsfw_model: layer 0 .* taking 128 inputs"):
        load_head(tmp_path / "bad.pt", 128, "download.preclean.nsfw_model")


def test_classifier_params_are_validated():
    from diht_core.config import ParamsError

    with pytest.raises(ParamsError, match="download.preclean.clip_weights"):
        validate_params({"download": {"preclean": {"nsfw_model": "nsfw.pt"}}})
    with pytest.raises(ParamsError, match="download.preclean.max_watermark"):
        validate_params({"download": {"preclean": {"max_watermark": 1.5}}})
    assert np.isclose(validate_params({}).download.preclean.max_watermark, 0.5)
