"""The recaption stage (FFF's pseudo-captions) with a tiny randomly initialised Blip2ForConditionalGeneration of
the real class, built here and saved with save_pretrained: K captions per image in the shards' json, the originals
kept first, bad samples passed through and counted, resumable per shard, the same captions for the same seed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, project_env
from diht_core.config import ParamsError, RecaptionParams, load_params, validate_params
from diht_core.data.recaption import DONE, output_dir, recaption_shards
from diht_core.data.shards import iter_shard, read_samples
from diht_core.models.captioners import Blip2Captioner
from test_bad_data import BAD, make_corpus

K = 3
WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "circle", "star", "square", "on", "in", "grass", "sky"]


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """A tiny BLIP-2 (ViT, Q-Former, OPT text model of hidden size 32) and its processor, with a word-level
    tokenizer built with `tokenizers`: nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig, PreTrainedTokenizerFast)

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<image>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])  # OPT's BOS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>",
                                        unk_token="<unk>")  # the processor adds <image> as BLIP-2's do
    n, q = len(vocab), 4
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=30, patch_size=10),
        qformer_config=Blip2QFormerConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=37, encoder_hidden_size=32),
        text_config=OPTConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, ffn_dim=37, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                              eos_token_id=1),
        num_query_tokens=q, image_token_index=vocab["<image>"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip2")
    model = Blip2ForConditionalGeneration(cfg)
    model.generation_config.suppress_tokens = [0, 2, 3]  # random weights: no pad, unk or image token in a caption
    model.save_pretrained(path)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 30, "width": 30}),
                               tokenizer=tokenizer, num_query_tokens=q)
    processor.save_pretrained(path)
    return path


def _cfg(path, **kw) -> RecaptionParams:
    return RecaptionParams(enabled=True, model_path=str(path), num_captions=K, max_new_tokens=6, min_new_tokens=2,
                           batch_size=2, device="cpu", **kw)


@pytest.fixture(scope="module")
def captioner(blip2_dir):
    from diht_core.models.captioners import make_captioner

    return make_captioner(_cfg(blip2_dir))


def test_blip2_captioner_gives_k_captions_per_image_and_a_seed_repeats_them(captioner):
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (40 + 5 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    a = captioner.caption(images, seed=7)
    assert [len(c) for c in a] == [K] * 3
    assert all(c and set(c.split()) <= set(WORDS) for caps in a for c in caps)  # decoded words, no special tokens
    assert captioner.caption(images, seed=7) == a
    assert captioner.caption(images, seed=8) != a
    assert len({c for caps in a for c in caps}) > 1  # sampled: diverse


def _run(src, out, caption, seed=0):
    return recaption_shards(src, out, lambda: caption, "digest", seed, batch_size=2, max_pixels=89_478_485)


def test_shards_get_k_captions_faults_pass_through_and_runs_resume(tmp_path, captioner):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    corpus = make_corpus(src)  # 0.tar: 3 good samples and every fault; 1.tar: cut after its first sample
    metrics = _run(src, out, captioner.caption)
    assert metrics["images"] == len(corpus["good"]) and metrics["captions_written"] == K * len(corpus["good"])
    assert metrics["blank_captions"] == 0 and metrics["samples"] == len(corpus["good"]) + len(BAD)
    expected = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert metrics["skipped_by_reason"] == expected and metrics["skipped"] == len(BAD)
    assert metrics["truncated_shards"]["1.tar"]["read"] == 1
    samples = {s["key"]: s for shard in ("0.tar", "1.tar") for s in read_samples(out / shard, need_caption=True)}
    assert sorted(samples) == sorted(corpus["good"] + list(BAD))  # the cut shard's output is complete
    for key in corpus["good"]:
        s = samples[key]
        assert s["fault"] is None and len(s["captions"]) == 1 + K and s["captions"][0] == s["txt"]
        assert s["json"]["noise"] == "clean" and s["json"]["recaption"] == {"original": 1, "generated": K}
    raw_in = {r["__key__"]: r for r in iter_shard(src / "0.tar")}
    for r in iter_shard(out / "0.tar"):
        if r["__key__"] in BAD:  # copied byte for byte: the reader downstream counts it under the same reason
            assert {k: v for k, v in r.items() if k != "__url__"} == \
                {k: v for k, v in raw_in[r["__key__"]].items() if k != "__url__"}
    assert (out / DONE).exists()
    first = {f.name: f.read_bytes() for f in out.glob("*.tar")}

    def broken(images, seed):
        raise RuntimeError("the captioner must not run for shards already done")

    again = _run(src, out, broken)
    assert again["shards_resumed"] == 2 and again["images_per_s"] is None
    assert {k: v for k, v in again.items() if k not in ("shards_resumed", "images_per_s")} == \
        {k: v for k, v in metrics.items() if k not in ("shards_resumed", "images_per_s")}

    # a run killed in the second shard: the first stays done, the rerun redoes only the second, same bytes
    (out / "1.tar").unlink()
    calls = []

    def dies(images, seed):
        calls.append(seed)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(src, out, dies)
    assert not (out / DONE).exists() and not (out / "1.tar").exists() and len(calls) == 1
    resumed = _run(src, out, captioner.caption)
    assert resumed["shards_resumed"] == 1
    assert {f.name: f.read_bytes() for f in out.glob("*.tar")} == first  # the seed decides the captions


def test_another_seed_other_captions_and_a_removed_shard_is_removed(tmp_path, captioner):
    src = tmp_path / "in"
    src.mkdir()
    make_corpus(src)
    _run(src, tmp_path / "a", captioner.caption, seed=0)
    _run(src, tmp_path / "b", captioner.caption, seed=1)
    assert (tmp_path / "a" / "0.tar").read_bytes() != (tmp_path / "b" / "0.tar").read_bytes()
    (src / "1.tar").unlink()
    assert _run(src, tmp_path / "a", captioner.caption)["shards"] == 1
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == sorted([DONE, "0.recaption.json", "0.tar"])


def test_params_fff_config_and_model_path_required():
    with pytest.raises(ParamsError, match="recaption.model_path"):
        validate_params({"recaption": {"enabled": True}})
    with pytest.raises(ParamsError, match="recaption.kind"):
        validate_params({"recaption": {"kind": "llava"}})
    fff = load_params(ROOT / "configs" / "fff.yaml")
    assert fff.recaption.enabled and fff.train.loss == "sigmoid" and fff.train.captions_per_image > 1


def test_a_hub_name_is_refused_never_downloaded(tmp_path):
    """recaption.model_path must be a local folder of save_pretrained files: a Hub id is refused before transformers
    is asked for anything (nothing can be downloaded at run time)."""
    for path in ("Salesforce/blip2-opt-2.7b", str(tmp_path)):  # a Hub id; a folder without config.json
        with pytest.raises(FileNotFoundError, match="recaption.model_path"):
            Blip2Captioner(RecaptionParams(enabled=True, model_path=path))


@pytest.mark.slow  # a subprocess: imports mlflow, open_clip and transformers (about 30 s on 2 idle cores)
def test_stage_cli_writes_captions_that_train_reads(tiny_project, blip2_dir):
    """`python -m tasks.recaption` on CAT-filtered shards; train's data then has 1 + K captions per image, and
    train.captions_per_image draws from them."""
    import torch

    from diht_core.data.shards import write_shard
    from diht_core.train.data import load_train_set, shard_dir
    from test_bad_data import CAPTIONS, _good

    rng = np.random.default_rng(1)
    filtered = tiny_project / "data" / "filtered"
    write_shard(filtered / "000000.tar", [_good(rng, f"{i:03d}", CAPTIONS[i % 3]) for i in range(5)])
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["recaption"].update({"enabled": True, "model_path": str(blip2_dir), "num_captions": K,
                                "max_new_tokens": 5, "batch_size": 4, "device": "cpu"})
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "tasks.recaption", "--params", "params.yaml"], cwd=tiny_project,
                         env=project_env(tiny_project), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "recaption: samples" in res.stderr  # the progress bar says what it counts
    metrics = json.loads((tiny_project / "metrics" / "recaption.json").read_text())
    assert metrics["enabled"] and metrics["images"] == 5 and metrics["captions_written"] == 5 * K

    p = load_params(tiny_project / "params.yaml")
    shards = shard_dir(p.paths, p.train.source, p.recaption.enabled)
    assert shards == output_dir(p.paths.data, "filtered")
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.arange(len(texts)).unsqueeze(1)  # a caption's token is its row

    data = load_train_set(tiny_project / shards, 32, tokenizer, 89_478_485)
    assert [len(ix) for ix in data.caption_index] == [1 + K] * 5
    generated = [c for s in read_samples(tiny_project / shards / "000000.tar", need_caption=True)
                 for c in s["captions"][1:]]
    cfg = p.train.model_copy(update={"loss": "sigmoid", "captions_per_image": 1 + K, "batch_size": 5, "steps": 1,
                                     "seed": 0})
    batch = next(data.batches(cfg, 0))
    texts = [seen[int(t)] for t in batch["text"][:, 0]]
    assert len(texts) == 5 * (1 + K) and set(generated) <= set(texts)  # every pseudo-caption is a positive


def test_train_waits_for_recaption_and_disabled_is_a_noop(tiny_project):
    from tasks._stage import MissingInput, check_inputs
    from tasks.recaption import body

    p = load_params(tiny_project / "params.yaml", {"paths": {"data": str(tiny_project / "data")},
                                                   "recaption": {"enabled": True, "model_path": "x"}})
    (tiny_project / "data" / "filtered").mkdir(parents=True)
    (tiny_project / "data" / "pseudo_labels").mkdir()
    (tiny_project / "data" / "pseudo_labels" / "vocab_sizes.json").write_text("{}")
    with pytest.raises(MissingInput, match="run the recaption stage first"):
        check_inputs("train", p)
    off = load_params(tiny_project / "params.yaml", {"paths": {"data": str(tiny_project / "data")}})
    check_inputs("train", off)
    assert body(off, None) == {"enabled": False} and (tiny_project / "data" / "recaptioned").is_dir()
