import numpy as np
import pytest
import torch

from diht_core.concepts import teacher as T
from diht_core.concepts.vocabulary import sqrt_resampling_weights
from diht_core.config import TeacherParams


def test_classifier_learns_a_planted_concept():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 16, generator=g)
    y = np.zeros((400, 3), dtype=np.float32)
    y[:, 0] = (feats[:, 3] > 0).numpy()          # concept 0 is planted in feature 3
    y[:, 1] = 1 - y[:, 0]
    y[:40, 2] = 1                                  # a rare concept
    clf = T.train_concept_classifier(feats[:300], y[:300], sqrt_resampling_weights(y[:300]),
                                     TeacherParams(classifier_epochs=30, classifier_lr=0.05), seed=0)
    with torch.no_grad():
        s = clf(feats[300:]).numpy()
    assert T.mean_average_precision(s[:, :2], y[300:, :2]) > 0.95
    assert T.topk_accuracy(s, y[300:], 1) > 0.9


def test_teacher_is_frozen_and_features_are_stable():
    torch.manual_seed(0)
    model = T.freeze(T.build_teacher("test_resnet"))
    pre = T.load_teacher(TeacherParams(arch="test_resnet", image_size=32))[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    f1 = T.features(model, pre, images)
    assert not f1.requires_grad and all(not p.requires_grad for p in model.parameters())
    assert torch.equal(f1, T.features(model, pre, images))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_teacher_weights_from_a_local_path(tmp_path):
    torch.manual_seed(1)
    a = T.build_teacher("test_resnet")
    torch.save(a.state_dict(), tmp_path / "t.pt")
    b = T.build_teacher("test_resnet", tmp_path / "t.pt")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        T.build_teacher("test_resnet", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown timm model"):
        T.build_teacher("no_such_arch_xyz")


def test_label_vector():
    v = T.label_vector({"shapes": ["circle"], "colours": ["red", "blue"], "sizes": ["small"], "relation": "holds",
                        "count": 2})
    on = {T.LABELS[i] for i in np.flatnonzero(v)}
    assert on == {"shape:circle", "colour:red", "colour:blue", "size:small", "relation:holds", "count:2"}


def test_open_clip_tower_as_teacher(tmp_path):
    from PIL import Image

    from diht_core.models import create_model

    torch.manual_seed(0)
    clip, preprocess, _ = create_model("diht-tiny-vit")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # a plain open_clip checkpoint
    teacher, pre = T.load_teacher(TeacherParams(arch="open_clip:diht-tiny-vit", weights=str(tmp_path / "clip.pt")))
    T.freeze(teacher)
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (48, 48), (80, 50))]
    images = torch.stack([pre.to_uint8(im) for im in pils])
    with torch.no_grad():
        expected = clip.encode_image(torch.stack([preprocess(im) for im in pils]))  # open_clip's own preprocessing
    assert pre.source == "open_clip:diht-tiny-vit" and pre.crop == 48
    assert torch.allclose(T.features(teacher, pre, images), expected, atol=1e-5)
    assert T.multilabel_scores(teacher, pre, images).shape == (3, len(T.LABELS))
