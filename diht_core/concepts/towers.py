"""The teacher models: timm models, open_clip image towers and torchvision classification models, built from a name
(``resnet18``, ``open_clip:ViT-B-32``, ``torchvision:vit_h_14``) with weights from a local file, and each one's own
preprocessing."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ..config import TeacherParams
from ..models import create_model, image_size
from . import preprocess as P
from .labels import LABELS

TORCHVISION, OPEN_CLIP = "torchvision:", "open_clip:"


class Tower(nn.Module):
    """timm's feature/head interface over a feature extractor ``body`` and a linear ``head``."""

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, features, pre_logits: bool = False):
        return features if pre_logits else self.head(features)

    def forward(self, x):
        return self.head(self.body(x))


class OpenCLIPTower(Tower):
    """An open_clip image tower with a multi-label head."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        self.name = name
        self.visual = create_model(name)[0].visual
        self.num_features = self.visual.output_dim
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    @property
    def body(self):
        return self.visual

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if not any(k.startswith("head.") for k in state):  # a plain open_clip checkpoint: take its visual.*
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            return self.visual.load_state_dict(state, strict=strict)
        return super().load_state_dict(state, strict=strict, assign=assign)


class TorchvisionTower(Tower):
    """A torchvision classification model split at its classification head (its last ``nn.Linear``): ``body`` is
    the model with that layer replaced by Identity, so it outputs the penultimate features (a ViT's class token after
    the encoder, a ResNet's pooled features), ``head`` is the layer. State dicts stay in torchvision's own layout."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name = name
        self.head_name = head_name(model, name)
        parent, _, leaf = self.head_name.rpartition(".")
        head = model.get_submodule(self.head_name)
        setattr(model.get_submodule(parent), leaf, nn.Identity())
        self.body, self.head = model, head  # in this order: the state dict keeps torchvision's key order
        self.num_features, self.num_classes = self.head.in_features, self.head.out_features
        self.register_state_dict_post_hook(_to_torchvision_keys)
        self.register_load_state_dict_pre_hook(_from_torchvision_keys)

    @property
    def input_size(self) -> int | None:
        """The one image side the model takes (a ViT's), None when any size works."""
        return getattr(self.body, "image_size", None)


def _to_torchvision_keys(module: TorchvisionTower, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        name = module.head_name + rest[len("head"):] if rest.startswith("head.") else rest[len("body."):]
        state[prefix + name] = state.pop(key)


def _from_torchvision_keys(module: TorchvisionTower, state: dict, prefix: str, *_) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        head = rest.startswith(module.head_name + ".")
        state[prefix + ("head" + rest[len(module.head_name):] if head else "body." + rest)] = state.pop(key)


def head_name(model: nn.Module, name: str) -> str:
    """The qualified name of a torchvision model's classification head: its last nn.Linear, which must be the
    layer that gives the logits."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"teacher.arch: {TORCHVISION}{name} has no linear classification head")
    return linears[-1][0]


def vit_image_size(state: dict) -> int | None:
    """The image side a torchvision ViT state dict was trained at (class token + (side / patch)² positions)."""
    if "encoder.pos_embedding" not in state or "conv_proj.weight" not in state:
        return None
    patch = state["conv_proj.weight"].shape[-1]
    side = round((state["encoder.pos_embedding"].shape[1] - 1) ** 0.5)
    return side * patch


def build_torchvision(name: str, num_classes: int, state: dict | None, vit_size: int | None) -> TorchvisionTower:
    """torchvision's ``name`` with ``num_classes`` outputs (a ViT at vit_size px), its weights from ``state``
    (torchvision's layout, loaded strictly). With a state the model is built on the meta device and takes the
    state's tensors (no random initialisation of, say, ViT-H/14's 632M parameters) unless it holds non-persistent
    buffers, which only its own __init__ computes."""
    from torchvision.models import get_model, get_model_builder

    kwargs = {"num_classes": num_classes}
    if get_model_builder(name).__module__.endswith("vision_transformer") and vit_size is not None:
        kwargs["image_size"] = vit_size
    if state is not None:
        with torch.device("meta"):
            model = get_model(name, weights=None, **kwargs)
        if not any(m._non_persistent_buffers_set for m in model.modules()):
            tower = TorchvisionTower(name, model)
            tower.load_state_dict(state, assign=True)
            return tower.float()
    tower = TorchvisionTower(name, get_model(name, weights=None, **kwargs))
    if state is not None:
        tower.load_state_dict(state)
    return tower


def _head_rows(state: dict, key: str) -> int | None:
    w = state.get(f"{key}.weight")
    return int(w.shape[0]) if w is not None else None


def load_weights(path: str | Path) -> dict:
    """A state dict from a local file (a dict holding "state_dict" too), memory-mapped where the format allows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher.weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) torch.save file cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_teacher(arch: str, weights: str | Path | None = None, num_classes: int = len(LABELS),
                  vit_size: int | None = None) -> nn.Module:
    """A timm model (``resnet18``), an open_clip image tower (``open_clip:ViT-B-32``) or a torchvision
    classification model (``torchvision:vit_h_14``), weights from a local file (never from a hub).

    Without weights the model has ``num_classes`` outputs (the labels it is pre-trained on here; a torchvision ViT
    takes vit_size px images). With weights the head is the file's: as many outputs as its classifier has rows, a
    ViT at the size its position embedding says; a timm or open_clip file without a classifier gets num_classes."""
    from torchvision.models import get_model

    state = load_weights(weights) if weights is not None else None
    if arch.startswith(OPEN_CLIP):
        model = OpenCLIPTower(arch[len(OPEN_CLIP):], num_classes)
    elif arch.startswith(TORCHVISION):
        name = arch[len(TORCHVISION):]
        if state is not None:
            with torch.device("meta"):
                rows = _head_rows(state, head_name(get_model(name, weights=None), name))
            return build_torchvision(name, rows or num_classes, state, vit_image_size(state))
        return build_torchvision(name, num_classes, None, vit_size)
    else:
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except RuntimeError as err:
            raise ValueError(f"teacher.arch: unknown timm model {arch!r}") from err
        rows = _head_rows(state, model.pretrained_cfg.get("classifier", "")) if state is not None else None
        if rows is not None and rows != num_classes:
            model.reset_classifier(rows)
    if state is not None:
        model.load_state_dict(state)
    return model


def torchvision_weights(name: str, member: str, input_size: int | None):
    """The torchvision weights enum member whose preprocessing a ``torchvision:<name>`` teacher uses: ``member``
    (teacher.preprocess) when not "auto"; otherwise the model's DEFAULT weights, unless the model takes one image
    size (a ViT) that DEFAULT does not crop to: then the one member that does."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    members = list(enum.__members__)
    if member != "auto":
        if member not in members:
            raise ValueError(f"teacher.preprocess: {member!r} is not a weights config of {TORCHVISION}{name}; "
                             f"known: {members}")
        return enum[member]
    if input_size is None or enum.DEFAULT.transforms().crop_size == [input_size]:
        return enum.DEFAULT
    matching = [w for w in enum if w.transforms().crop_size == [input_size]]
    if len(matching) != 1:
        raise ValueError(f"teacher.preprocess: auto finds {len(matching)} weights configs of {TORCHVISION}{name} "
                         f"at {input_size} px ({[w.name for w in matching]}); set teacher.preprocess to one of "
                         f"{members}")
    return matching[0]


def input_size(model: nn.Module) -> int | None:
    """The one image side a teacher takes (an open_clip tower, a torchvision ViT), None when any size works."""
    if isinstance(model, OpenCLIPTower):
        return image_size(model)
    return model.input_size if isinstance(model, TorchvisionTower) else None


def predicts_labels(model: nn.Module) -> bool:
    """Whether the teacher's head scores the split's LABELS (pre-trained here, or weights saved by this stage), not
    the classes of weights of its own (ImageNet's)."""
    return model.num_classes == len(LABELS)


def teacher_preprocess(model: nn.Module, t: TeacherParams) -> P.Preprocess:
    """The preprocessing this teacher is read with: the torchvision weights config teacher.preprocess names;
    otherwise (auto) the pre-training's (``preprocess.pretrained_here``, at teacher.image_size) for a teacher
    pre-trained here or weights saved by this stage (a timm or torchvision head over the split's LABELS), and the
    weights' own for other weights: timm's data config, open_clip's preprocess config, the torchvision weights
    config of ``torchvision_weights``."""
    tv = isinstance(model, TorchvisionTower)
    if t.preprocess != "auto":
        if not tv:
            raise ValueError(f"teacher.preprocess: {t.preprocess!r} names a torchvision weights config, but "
                             f"teacher.arch {t.arch!r} is not torchvision:<name>")
        return P.from_torchvision(torchvision_weights(model.name, t.preprocess, model.input_size))
    if t.weights is None or (predicts_labels(model) and not isinstance(model, OpenCLIPTower)):
        return P.pretrained_here(t.image_size)
    if tv:
        return P.from_torchvision(torchvision_weights(model.name, "auto", model.input_size))
    if isinstance(model, OpenCLIPTower):
        return P.from_open_clip(model.visual, model.name)
    return P.from_timm(model)


def load_teacher(t: TeacherParams, num_classes: int = len(LABELS)) -> tuple[nn.Module, P.Preprocess]:
    """The teacher of these params (``build_teacher``) and its preprocessing (``teacher_preprocess``); a model that
    takes one image size must get it from the preprocessing (ValueError naming the param)."""
    vit_size = t.image_size
    if t.preprocess != "auto" and t.arch.startswith(TORCHVISION):
        vit_size = torchvision_weights(t.arch[len(TORCHVISION):], t.preprocess, None).transforms().crop_size[0]
    model = build_teacher(t.arch, t.weights, num_classes, vit_size)
    pre = teacher_preprocess(model, t)
    size = input_size(model)
    if size is not None and size != pre.crop:
        key = "teacher.image_size" if t.weights is None and t.preprocess == "auto" else "teacher.preprocess"
        raise ValueError(f"{key}: {t.arch} takes {size} px images but the preprocessing ({pre.source}) crops "
                         f"{pre.crop} px")
    return model, pre
