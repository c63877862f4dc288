import json
import math

import numpy as np
import pytest
import torch

from diht_core.data.scenes import render, sample_scene
from diht_core.data.shards import encode_jpg, write_shard
from diht_core.models import ConceptHeads, create_model, image_size, list_models
from diht_core.data.pseudo_labels import densify, sparsify
from diht_core.config import TrainParams
from diht_core.train import batch_indices, cosine_lr, load_train_set, train
from diht_core.train.run import init_kwargs

SIZE = image_size(create_model("diht-tiny-vit")[0])
MAX_PIXELS = 89_478_485  # download.url_list.max_pixels


def test_cosine_lr_is_a_function_of_the_step():
    lrs = [cosine_lr(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    seen = torch.cat([batch_indices(s, n, b, seed=0) for s in range(5)])  # 20 = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, n, b, 0), batch_indices(3, n, b, 0))
    assert not torch.equal(torch.cat([batch_indices(s, n, b, 1) for s in range(3)]), seen[:12])


def test_model_registry():
    assert "diht-tiny-vit" in list_models() and "ViT-B-32" in list_models()
    with pytest.raises(ValueError, match="unknown model config"):
        create_model("no-such-model")
    with pytest.raises(FileNotFoundError):
        create_model("diht-tiny-vit", pretrained="/nonexistent.pt")


def test_checkpoint_loads_with_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model, _, _ = create_model("diht-tiny-vit")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = open_clip.create_model("diht-tiny-vit", pretrained=str(tmp_path / "m.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def _shards(tmp_path, n=24):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        sc = sample_scene(rng)
        caps = [f"a {sc.shapes[0].colour} {sc.shapes[0].shape}", f"one {sc.shapes[0].shape}"][: 1 + i % 2]
        samples.append({"__key__": f"{i:09d}", "jpg": encode_jpg(render(sc, 64, rng)), "txt": caps[0],
                        "json": json.dumps({"captions": caps}).encode()})
    write_shard(tmp_path / "0.tar", samples[: n // 2])
    write_shard(tmp_path / "1.tar", samples[n // 2:])
    return [s["__key__"] for s in samples]


def test_train_set_keeps_every_caption_of_a_sample(tmp_path):
    """download.max_captions and recaption go to 10 captions a sample: all of them are trained on (the in-memory
    loader used to keep 8 and drop the rest without a count)."""
    rng = np.random.default_rng(0)
    sc = sample_scene(rng)
    caps = [f"caption number {i} of a {sc.shapes[0].shape}" for i in range(10)]
    write_shard(tmp_path / "0.tar", [{"__key__": "000000000", "jpg": encode_jpg(render(sc, 64, rng)), "txt": caps[0],
                                      "json": json.dumps({"captions": caps}).encode()}])
    _, _, tok = create_model("diht-tiny-vit")
    ts = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS)
    assert len(ts.caption_index[0]) == 10 and torch.equal(ts.tokens, tok(caps))


def _pseudo(keys, drop=()):
    kept = [k for k in keys if k not in drop]
    probs = torch.softmax(torch.randn(len(kept), 6), -1)
    o, a = sparsify(probs, 3), sparsify(probs[:, :4], 2)
    return {"index": {k: i for i, k in enumerate(kept)}, "objects": densify(*o, 6), "attributes": densify(*a, 4)}


def test_train_set_joins_pseudo_labels_by_key(tmp_path):
    keys = _shards(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    pl = _pseudo(keys)
    ts = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS, pl)
    assert ts.keys == keys and len(ts.caption_index[1]) == 2
    for i, k in enumerate(ts.keys):
        assert torch.equal(ts.obj_targets[i], pl["objects"][pl["index"][k]])
    with pytest.raises(KeyError, match="000000005"):
        load_train_set(tmp_path, SIZE, tok, MAX_PIXELS, _pseudo(keys, drop={"000000005"}), missing="error")
    ts = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS, _pseudo(keys, drop={"000000005"}), missing="skip")
    assert ts.skipped == 1 and "000000005" not in ts.keys
    assert ts.faults.by_reason == {"missing_pseudo_label": 1}


def _run(tmp_path, data, cfg, stop_at=None):
    torch.manual_seed(0)
    model, _, _ = create_model("diht-tiny-vit")
    heads = ConceptHeads(model.visual.output_dim, 6, 4)

    class Killed(Exception):
        pass

    def log_fn(step, rec):
        if stop_at is not None and step == stop_at:
            raise Killed

    try:
        out = train(model, data, cfg, tmp_path / "ckpt", log_fn=log_fn, heads=heads)
    except Killed:
        return None, None
    return model, out


def test_resume_continues_the_same_run(tmp_path):
    keys = _shards(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    torch.manual_seed(0)
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS, _pseudo(keys))
    cfg = TrainParams(seed=0, steps=6, batch_size=8, warmup_steps=2, checkpoint_every=2, log_every=1,
                      lambda_obj=0.5, lambda_attr=0.5)
    straight, out = _run(tmp_path / "a", data, cfg)
    assert out["resumed_from_step"] == 0 and len(out["history"]) == 6
    assert _run(tmp_path / "b", data, cfg, stop_at=5) == (None, None)   # killed after the step-4 checkpoint
    resumed, out = _run(tmp_path / "b", data, cfg)
    assert out["resumed_from_step"] == 4
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    assert out["history"][-1]["loss"] == pytest.approx(_run(tmp_path / "c", data, cfg)[1]["history"][-1]["loss"])


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    _shards(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS)
    cfg = TrainParams(seed=0, steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1)
    assert _run(tmp_path / "d", data, cfg, stop_at=3) == (None, None)
    data.images = data.images.flip(-1)  # same config, different data
    _, out = _run(tmp_path / "d", data, cfg)
    assert out["resumed_from_step"] == 0 and len(out["history"]) == 4


OPENAI_LAYOUT = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                 "visual.transformer.resblocks.0.ln_1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                 "visual.transformer.resblocks.0.attn.out_proj.weight", "visual.transformer.resblocks.0.ln_2.bias",
                 "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.bias",
                 "visual.ln_post.weight", "visual.proj", "token_embedding.weight", "positional_embedding",
                 "transformer.resblocks.0.attn.in_proj_weight", "ln_final.weight", "text_projection", "logit_scale"]


def test_diht_released_checkpoint_layout_loads(tmp_path):
    """A raw state dict in DiHT's OpenAI-CLIP layout, named <name>_<sha256>.ckpt, loads and is verified."""
    import hashlib

    torch.manual_seed(3)
    src, _, _ = create_model("diht-tiny-vit")
    state = {k: v for k, v in src.state_dict().items() if k != "attn_mask"}
    assert set(OPENAI_LAYOUT) <= set(state) and "visual.conv1.bias" not in state
    raw = tmp_path / "raw.ckpt"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    ckpt = tmp_path / f"diht_tiny_{digest}.ckpt"
    raw.rename(ckpt)
    model, _, _ = create_model("diht-tiny-vit", pretrained=str(ckpt))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)  # plain GELU, not QuickGELU
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    bad = tmp_path / f"diht_tiny_{'0' * 64}.ckpt"
    bad.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="SHA256"):
        create_model("diht-tiny-vit", pretrained=str(bad))


@pytest.mark.parametrize("loss, extra", [("hn-nce", {"hn_alpha": 0.8, "hn_beta": 0.5}),
                                         ("sigmoid", {"fff_it_threshold": 0.9, "fff_tt_threshold": 0.95})])
def test_train_with_hard_negative_and_sigmoid_losses(tmp_path, loss, extra):
    import math

    _shards(tmp_path)
    torch.manual_seed(0)
    kw = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "sigmoid" else {}
    model, _, tok = create_model("diht-tiny-vit", **kw)
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS)
    cfg = TrainParams(seed=0, steps=3, batch_size=8, warmup_steps=1, log_every=1, loss=loss, **extra)
    out = train(model, data, cfg, tmp_path / "ck")
    assert len(out["history"]) == 3 and all(math.isfinite(h["loss"]) for h in out["history"])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again, _, _ = create_model("diht-tiny-vit", pretrained=str(tmp_path / "m.pt"))  # bias detected and loaded
    if loss == "sigmoid":
        assert torch.equal(again.logit_bias, model.logit_bias)


def test_sigmoid_loss_needs_a_bias(tmp_path):
    _shards(tmp_path)
    model, _, tok = create_model("diht-tiny-vit")
    with pytest.raises(ValueError, match="logit_bias"):
        train(model, load_train_set(tmp_path, SIZE, tok, MAX_PIXELS),
              TrainParams(seed=0, steps=1, batch_size=8, loss="sigmoid"), tmp_path / "ck")


@pytest.mark.parametrize("loss", ["infonce", "hn-nce", "sigmoid"])
def test_accumulation_and_checkpointing_match_one_full_batch(tmp_path, loss):
    """accum_steps=4 (cached features) and gradient checkpointing give the same update as one full batch."""
    import math

    keys = _shards(tmp_path)
    kw = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "sigmoid" else {}
    extra = {"hn_beta": 0.5} if loss == "hn-nce" else {}
    _, _, tok = create_model("diht-tiny-vit")
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS, _pseudo(keys))

    def one_step(**cfg_kw):
        torch.manual_seed(0)
        model, _, _ = create_model("diht-tiny-vit", **kw)
        heads = ConceptHeads(model.visual.output_dim, 6, 4)
        cfg = TrainParams(seed=0, steps=1, batch_size=16, warmup_steps=1, loss=loss, lambda_obj=0.5, lambda_attr=0.5,
                          **extra, **cfg_kw)
        train(model, data, cfg, tmp_path / f"ck{len(cfg_kw)}{cfg_kw}", heads=heads)
        return model.state_dict()

    ref = one_step()
    for variant in ({"accum_steps": 4}, {"grad_checkpointing": True}):
        got = one_step(**variant)
        for k, v in ref.items():
            assert torch.allclose(v, got[k], atol=2e-5, rtol=1e-4), (variant, k)


def test_bf16_autocast_trains(tmp_path):
    import math

    _shards(tmp_path)
    torch.manual_seed(0)
    model, _, tok = create_model("diht-tiny-vit")
    out = train(model, load_train_set(tmp_path, SIZE, tok, MAX_PIXELS),
                TrainParams(seed=0, steps=2, batch_size=8, warmup_steps=1, log_every=1, precision="bf16"), tmp_path / "ck")
    assert all(math.isfinite(h["loss"]) for h in out["history"])


def test_several_captions_per_image_are_consecutive_rows_of_that_image(tmp_path):
    keys = _shards(tmp_path)  # odd samples have 2 captions, even ones 1
    _, _, tok = create_model("diht-tiny-vit")
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS)
    cfg = TrainParams(seed=0, steps=2, batch_size=8, captions_per_image=3, loss="sigmoid")
    for step, batch in enumerate(data.batches(cfg, 0)):
        idx = batch_indices(step, len(data), 8, 0).tolist()
        assert batch["text"].shape[0] == 3 * 8
        for r, i in enumerate(idx):
            own = {tuple(data.tokens[j].tolist()) for j in data.caption_index[i]}
            got = [tuple(t.tolist()) for t in batch["text"][3 * r:3 * r + 3]]
            assert set(got) == own  # every caption of the image, cycled to K
    halves = [list(data.batches(cfg, 0, rank=r, world_size=2)) for r in range(2)]
    whole = list(data.batches(cfg, 0))
    for s in range(2):  # the ranks' shares make up the global batch
        assert torch.equal(torch.cat([halves[0][s]["text"], halves[1][s]["text"]]), whole[s]["text"])
    with pytest.raises(ValueError, match="sigmoid"):  # K > 1 needs the sigmoid loss: refused by the params
        TrainParams(seed=0, steps=2, batch_size=8, captions_per_image=3)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    _shards(tmp_path)
    _, _, tok = create_model("diht-tiny-vit")
    data = load_train_set(tmp_path, SIZE, tok, MAX_PIXELS)

    def losses(**kw):
        torch.manual_seed(0)
        model, _, _ = create_model("diht-tiny-vit")
        cfg = TrainParams(seed=0, steps=3, batch_size=8, warmup_steps=1, log_every=1, **kw)
        return [h["loss"] for h in train(model, data, cfg, tmp_path / f"ck{kw}")["history"]]

    assert np.allclose(losses(compile=True), losses(), rtol=1e-4, atol=1e-4)


def test_distinct_scene_batches_hold_no_scene_twice():
    """batch_sampler distinct_scenes: every image once an epoch, no scene twice in a batch (batches across two
    epochs included) where the random order repeats scenes; NO_SCENE never clashes; a pure function of the seed."""
    from diht_core.data.planted import NO_SCENE
    from diht_core.train.data import DistinctSceneOrder

    rng = np.random.default_rng(0)
    scenes = rng.integers(0, 40, size=203).tolist()  # ~5 images a scene: random batches of 16 repeat scenes
    scenes[:10] = [NO_SCENE] * 10
    n, b = len(scenes), 16
    order = DistinctSceneOrder(scenes, b, seed=3)
    steps = 3 * n // b  # 3 epochs, batches across their ends
    batches = [batch_indices(s, n, b, 3, order).tolist() for s in range(steps)]
    flat = [i for bt in batches for i in bt]
    for e in range(2):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    known = [[scenes[i] for i in bt if scenes[i] != NO_SCENE] for bt in batches]
    # clashes counts every epoch built, the unused end of the last one too; at most 3 an epoch, at its end
    assert sum(len(k) - len(set(k)) for k in known) <= order.clashes <= 3 * 3
    plain = [[scenes[i] for i in batch_indices(s, n, b, 3).tolist() if scenes[i] != NO_SCENE] for s in range(steps)]
    assert sum(len(k) - len(set(k)) for k in plain) > 20
    assert batches == [batch_indices(s, n, b, 3, DistinctSceneOrder(scenes, b, 3)).tolist() for s in range(steps)]


@pytest.mark.parametrize("sampler", ["distinct_scenes", "swap_families"])
def test_planted_batch_samplers_need_the_planted_scenes_and_the_memory_loader(sampler):
    from diht_core.config import ParamsError, validate_params
    from diht_core.train.data import TrainSet

    with pytest.raises(ParamsError, match=f"train.*batch_sampler: {sampler} needs loader: memory"):
        validate_params({"train": {"batch_sampler": sampler, "loader": "webdataset"}})
    data = TrainSet(["a", "b"], torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.long),
                    [[0], [1]])
    cfg = validate_params({"train": {"batch_sampler": sampler, "steps": 1, "batch_size": 2}}).train
    with pytest.raises(ValueError, match=f"{sampler} needs the planted scene"):
        next(data.batches(cfg, 0))


@pytest.mark.parametrize("cfg, scale, bias", [({}, 1 / 0.07, None), ({"loss": "sigmoid"}, 10.0, -10.0),
                                              ({"logit_scale_init": 100.0}, 100.0, None),
                                              ({"loss": "sigmoid", "logit_scale_init": 30.0}, 30.0, -10.0)])
def test_training_starts_from_the_logit_scale_train_asks(cfg, scale, bias):
    """train.logit_scale_init sets the scale at step 0 (the model's own 1/0.07, or SigLIP's 10, without it), and
    leaves the weights' init alone."""
    torch.manual_seed(0)
    model = create_model("diht-tiny-vit", **init_kwargs(TrainParams(**cfg)))[0]
    assert model.logit_scale.exp().item() == pytest.approx(scale, rel=1e-5)
    assert (model.logit_bias is None if bias is None else model.logit_bias.item() == pytest.approx(bias))
    torch.manual_seed(0)
    plain = create_model("diht-tiny-vit")[0]
    assert torch.equal(model.visual.conv1.weight, plain.visual.conv1.weight)
    with pytest.raises(ValueError, match="logit_scale_init"):
        TrainParams(logit_scale_init=200.0)


@pytest.mark.parametrize("scale", [None, 50.0])
def test_a_warm_start_begins_at_the_file_s_weights(tmp_path, scale):
    """train.init_from ("{seed}" -> train.seed) loads the file's weights; logit_scale_init replaces its scale;
    a missing file is refused naming the key."""
    from diht_core.train.run import initial_model

    model = create_model("diht-tiny-vit")[0]
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        model.visual.proj.mul_(2.0)
    (tmp_path / "seed3").mkdir()
    torch.save(model.state_dict(), tmp_path / "seed3" / "model.pt")
    got = initial_model(TrainParams(init_from=str(tmp_path / "seed{seed}" / "model.pt"), seed=3,
                                    logit_scale_init=scale))[0]
    for name, value in model.state_dict().items():
        if name != "logit_scale":
            torch.testing.assert_close(got.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert got.logit_scale.exp().item() == pytest.approx(scale or 20.0)
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        initial_model(TrainParams(init_from=str(tmp_path / "seed{seed}" / "model.pt"), seed=4))


def test_a_sigmoid_warm_start_takes_the_file_s_bias_or_its_own_init(tmp_path):
    """From an InfoNCE model (no bias in the file) the sigmoid loss starts at train.sigmoid_bias_init, not at
    open_clip's 0; from a sigmoid model at the file's bias; an InfoNCE run from a sigmoid model loads too."""
    from diht_core.train.run import initial_model

    torch.save(create_model("diht-tiny-vit")[0].state_dict(), tmp_path / "infonce.pt")
    got = initial_model(TrainParams(init_from=str(tmp_path / "infonce.pt"), loss="sigmoid", sigmoid_bias_init=-7.0))[0]
    assert got.logit_bias.item() == -7.0
    sigmoid = create_model("diht-tiny-vit", init_logit_bias=3.0)[0]
    torch.save(sigmoid.state_dict(), tmp_path / "sigmoid.pt")
    got = initial_model(TrainParams(init_from=str(tmp_path / "sigmoid.pt"), loss="sigmoid", sigmoid_bias_init=-7.0))[0]
    assert got.logit_bias.item() == 3.0
    got = initial_model(TrainParams(init_from=str(tmp_path / "sigmoid.pt"), loss="infonce"))[0]
    torch.testing.assert_close(got.visual.proj, sigmoid.visual.proj, rtol=0, atol=0)
