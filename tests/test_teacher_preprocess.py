"""Every teacher reads images with its own preprocessing (torchvision's weights transforms, timm's data config,
open_clip's), equal to the peer library's on the same PIL images; torchvision teachers (SWAG's ViT-H/14) load
torchvision's own state-dict layout and give the penultimate features."""

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import ResNet50_Weights, ViT_B_16_Weights, ViT_H_14_Weights

from diht_core.concepts import preprocess as P
from diht_core.concepts import teacher as T
from diht_core.concepts.towers import torchvision_weights, vit_image_size
from diht_core.config import ParamsError, TeacherParams, validate_params
from diht_core.data.images import image_to_uint8, normalize_images


def pil_images(sizes=((300, 200), (200, 310), (150, 150), (97, 61))):
    """Noise images (the hardest case for a resampling filter), landscape, portrait, square, smaller than a crop."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def ours(pre: P.Preprocess, img: Image.Image) -> torch.Tensor:
    return pre.normalize(pre.to_uint8(img)[None])[0]


@pytest.mark.parametrize("weights", [ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1, ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1,
                                     ResNet50_Weights.IMAGENET1K_V2, ViT_B_16_Weights.IMAGENET1K_V1])
def test_torchvision_preprocess_equals_its_transforms(weights):
    pre = P.from_torchvision(weights)
    transform = weights.transforms()
    for img in pil_images():
        theirs = transform(img)
        assert theirs.shape == (3, pre.crop, pre.crop)
        assert torch.allclose(ours(pre, img), theirs, atol=1e-5, rtol=0)  # one uint8 step is 0.017 here
    assert (pre.resize, pre.crop, pre.interpolation) == {
        "IMAGENET1K_SWAG_E2E_V1": (518, 518, "bicubic"), "IMAGENET1K_SWAG_LINEAR_V1": (224, 224, "bicubic"),
        "IMAGENET1K_V2": (232, 224, "bilinear"), "IMAGENET1K_V1": (256, 224, "bilinear")}[weights.name]
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("arch", ["resnet18", "test_resnet", "vit_tiny_patch16_224"])
def test_timm_preprocess_equals_create_transform(arch):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(arch, pretrained=False, num_classes=3)
    pre = P.from_timm(model)
    transform = create_transform(**resolve_data_config({}, model=model))
    for img in pil_images():
        assert torch.allclose(ours(pre, img), transform(img), atol=1e-5, rtol=0)


def test_a_timm_teacher_with_weights_reads_with_timms_config(tmp_path):
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pt")  # 1000 classes
    model, pre = T.load_teacher(TeacherParams(arch="resnet18", weights=str(tmp_path / "r18.pt")))
    assert (pre.resize, pre.crop, pre.interpolation, pre.mean) == (235, 224, "bicubic", (0.485, 0.456, 0.406))
    assert pre.source == "timm:resnet18.a1_in1k" and not T.predicts_labels(model)


def test_pretrained_here_keeps_the_square_pixels_and_stops_squashing():
    """The default teacher (pre-trained here) reads a square image exactly as before (the demo's bytes); a
    non-square one is centre-cropped, not squashed."""
    pre = P.pretrained_here(64)
    square = pil_images([(128, 128)])[0]
    assert torch.equal(pre.to_uint8(square), image_to_uint8(square, 64))
    x = pre.to_uint8(square)[None]
    assert torch.equal(pre.normalize(x), normalize_images(x))
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 40, 100))  # a blue band on the left: cropped away, not squeezed in
    assert pre.to_uint8(wide)[2].max() == 0 and image_to_uint8(wide, 64)[2].max() == 255


def test_torchvision_resnet_teacher_loads_torchvisions_layout(tmp_path):
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model, pre = T.load_teacher(TeacherParams(arch="torchvision:resnet18", weights=str(tmp_path / "resnet18.pth")))
    T.freeze(model)
    assert pre.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and (pre.resize, pre.crop) == (256, 224)
    assert list(model.state_dict()) == list(ref.state_dict())  # saved back in torchvision's layout
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items())
    assert not T.predicts_labels(model) and model.num_features == 512

    imgs = pil_images()
    x = torch.stack([resnet18_transform(img) for img in imgs])
    with torch.no_grad():
        expected = create_feature_extractor(ref, {"flatten": "f", "fc": "logits"})(x)
    feats = T.features(model, pre, torch.stack([pre.to_uint8(img) for img in imgs]))
    assert torch.allclose(feats, expected["f"], atol=1e-4)  # the pooled features: the input of fc
    assert torch.allclose(T.multilabel_scores(model, pre, torch.stack([pre.to_uint8(i) for i in imgs])),
                          expected["logits"], atol=1e-4)

    again = T.build_teacher("torchvision:resnet18", tmp_path / "resnet18.pth")
    torch.save(model.state_dict(), tmp_path / "teacher.pt")  # the stage's teacher.pt reloads as it was saved
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in T.build_teacher(
        "torchvision:resnet18", tmp_path / "teacher.pt").state_dict().items())


def resnet18_transform(img):
    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(img)


def test_torchvision_teacher_pretrained_here_and_an_explicit_config():
    model, pre = T.load_teacher(TeacherParams(arch="torchvision:resnet18", image_size=32))
    assert model.num_classes == len(T.LABELS) and pre.crop == 32 and pre.source.startswith("pre-trained here")
    model, pre = T.load_teacher(TeacherParams(arch="torchvision:resnet18", preprocess="IMAGENET1K_V1"))
    assert pre.crop == 224 and pre.interpolation == "bilinear"


def test_a_teacher_pt_of_this_stage_is_read_as_it_was_trained(tmp_path):
    """Weights saved by this stage (a head over the split's LABELS) keep the pre-training's preprocessing."""
    for arch in ("test_resnet", "torchvision:resnet18"):
        model, pre = T.load_teacher(TeacherParams(arch=arch, image_size=40))
        torch.save(model.state_dict(), tmp_path / "teacher.pt")
        again, pre_again = T.load_teacher(TeacherParams(arch=arch, image_size=40, weights=str(tmp_path / "teacher.pt")))
        assert pre_again == pre and pre.crop == 40 and T.predicts_labels(again)


def test_auto_picks_the_weights_config_of_a_vits_size():
    assert torchvision_weights("vit_h_14", "auto", 518) == ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    assert torchvision_weights("vit_h_14", "auto", 224) == ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1
    assert torchvision_weights("vit_b_16", "auto", 224) == ViT_B_16_Weights.IMAGENET1K_V1  # DEFAULT crops 224
    assert torchvision_weights("vit_b_16", "auto", 384) == ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
    assert torchvision_weights("resnet50", "auto", None) == ResNet50_Weights.IMAGENET1K_V2
    with pytest.raises(ValueError, match="teacher.preprocess: auto finds 0"):
        torchvision_weights("vit_h_14", "auto", 336)
    with pytest.raises(ValueError, match="teacher.preprocess: 'NOPE'"):
        torchvision_weights("vit_h_14", "NOPE", None)
    vit = {"encoder.pos_embedding": torch.zeros(1, 37 * 37 + 1, 4), "conv_proj.weight": torch.zeros(4, 3, 14, 14)}
    assert vit_image_size(vit) == 518 and vit_image_size({"fc.weight": torch.zeros(2, 2)}) is None


@pytest.mark.parametrize("raw, message", [
    ({"arch": "torchvision:no_such"}, "teacher.arch: unknown torchvision classification model 'no_such'"),
    ({"arch": "torchvision:fasterrcnn_resnet50_fpn"}, "teacher.arch: unknown torchvision classification"),
    ({"arch": "torchvision:vit_h_14", "preprocess": "IMAGENET1K_V1"}, "teacher.preprocess: 'IMAGENET1K_V1' is not"),
    ({"arch": "resnet18", "preprocess": "IMAGENET1K_V1"}, "teacher.preprocess: 'IMAGENET1K_V1' names a torchvision"),
])
def test_torchvision_names_are_checked_before_any_work(raw, message):
    from diht_core.models import check_names

    with pytest.raises(ParamsError, match=message):
        check_names(validate_params({"teacher": raw}))
    check_names(validate_params({"teacher": {"arch": "torchvision:vit_h_14", "preprocess": "IMAGENET1K_SWAG_E2E_V1"}}))


def test_cached_features_read_with_the_teacher_preprocessing(tmp_path):
    """The feature cache (what pseudo_labels reads) holds the features of torchvision's own preprocessing."""
    from diht_core.concepts.features import cached_features
    from diht_core.data.shards import write_shard

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    t = TeacherParams(arch="torchvision:resnet18", weights=str(tmp_path / "r.pth"))
    model, _ = T.load_teacher(t)
    imgs = pil_images()
    samples = []
    for i, img in enumerate(imgs):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"__key__": f"k{i}", "png": buf.getvalue(), "txt": "a caption"})
    (tmp_path / "filtered").mkdir()
    write_shard(tmp_path / "filtered" / "000000.tar", samples)
    keys, feats, _, _ = cached_features(T.freeze(model), [tmp_path / "filtered" / "000000.tar"], tmp_path / "cache",
                                        tmp_path / "r.pth", t, 10_000_000)
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = ref(torch.stack([resnet18_transform(img) for img in imgs]))
    assert keys == ["k0", "k1", "k2", "k3"]
    assert torch.allclose(feats, expected.half().float(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_swag_vit_h_14_on_random_weights_in_torchvisions_layout(tmp_path):
    """DiHT's teacher: vit_h_14 (632M parameters) on random weights saved as torchvision saves them, read with
    torchvision's SWAG preprocessing (the 224 px linear-probe config that weights at 224 px select), its features
    the class token after the encoder. Built on the meta device and filled in place (no 632M-parameter random init
    twice); the file lives in RAM (tmpfs) when there is one."""
    from pathlib import Path

    from torchvision.models.feature_extraction import create_feature_extractor

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        ref = torchvision.models.vit_h_14()
    state = {k: torch.empty(v.shape, dtype=v.dtype).normal_(0, 0.02, generator=g) for k, v in ref.state_dict().items()}
    shm = Path("/dev/shm")
    path = (shm if shm.is_dir() else tmp_path) / f"vit_h_14_{tmp_path.name}.pth"
    try:
        torch.save(state, path)
        del state
        model, pre = T.load_teacher(TeacherParams(arch="torchvision:vit_h_14", weights=str(path)))
        T.freeze(model)
        assert pre.source == "torchvision:ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1"
        assert (pre.resize, pre.crop, pre.interpolation) == (224, 224, "bicubic") and model.num_features == 1280
        ref.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)  # shares the file's pages
        ref.eval()
        imgs = pil_images([(300, 200)])
        transform = ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1.transforms()
        with torch.no_grad():
            nodes = torchvision.models.feature_extraction.get_graph_node_names(ref)[1]
            cls = nodes[nodes.index("heads.head") - 1]  # the class token the head reads
            expected = create_feature_extractor(ref, {cls: "f", "heads.head": "logits"})(transform(imgs[0])[None])
        x = torch.stack([pre.to_uint8(img) for img in imgs])
        feats = T.features(model, pre, x)
        assert feats.shape == (1, 1280) and torch.allclose(feats, expected["f"], atol=1e-4)
        assert torch.allclose(model.forward_head(feats), expected["logits"], atol=1e-4)
    finally:
        path.unlink(missing_ok=True)
