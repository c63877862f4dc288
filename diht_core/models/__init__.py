"""Model registry: our tiny open_clip configs are registered next to open_clip's own."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent
_registered = False


def register_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_models() -> list[str]:
    register_configs()
    return open_clip.list_models()


def check_names(params) -> None:
    """The names the params give that can be checked without running: train.model and benchmark.model (open_clip
    configs, ours included), teacher.arch (a timm model, ``open_clip:<config>`` or ``torchvision:<name>``) and
    teacher.preprocess; ParamsError naming the key."""
    import timm
    from timm.models import parse_model_name

    from ..config import ParamsError

    known = set(list_models())
    arch = params.teacher.arch
    if arch.startswith("torchvision:") or params.teacher.preprocess != "auto":
        _check_torchvision_teacher(arch, params.teacher.preprocess)
    names = [("train.model", params.train.model), ("benchmark.model", params.benchmark.model)]
    if arch.startswith("open_clip:"):
        names.append(("teacher.arch", arch.split(":", 1)[1]))
    for key, name in names:
        if name is not None and name not in known:
            raise ParamsError(f"{key}: unknown model config {name!r}; known: ours "
                              f"{sorted(p.stem for p in CONFIG_DIR.glob('*.json'))} plus open_clip's "
                              "(open_clip.list_models())")
    if arch.startswith(("open_clip:", "torchvision:")):
        return
    try:
        source, name = parse_model_name(arch)  # hf-hub:<repo> and local-dir:<path> are timm's sources
    except ValueError as err:
        raise ParamsError(f"teacher.arch: {err}") from None
    if source is None and not timm.is_model(name):
        raise ParamsError(f"teacher.arch: unknown timm model {arch!r} (timm.list_models(); or open_clip:<config>)")


def _check_torchvision_teacher(arch: str, preprocess: str) -> None:
    """teacher.arch ``torchvision:<name>``: a torchvision classification model; teacher.preprocess: auto, or one of
    its weights configs (only a torchvision teacher has them)."""
    import torchvision
    from torchvision.models import get_model_weights

    from ..config import ParamsError

    if not arch.startswith("torchvision:"):
        raise ParamsError(f"teacher.preprocess: {preprocess!r} names a torchvision weights config, but teacher.arch "
                          f"{arch!r} is not torchvision:<name> (use auto)")
    name = arch.split(":", 1)[1]
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ParamsError(f"teacher.arch: unknown torchvision classification model {name!r}; known: {known}")
    configs = list(get_model_weights(name).__members__)
    if preprocess != "auto" and preprocess not in configs:
        raise ParamsError(f"teacher.preprocess: {preprocess!r} is not a weights config of {arch}; known: auto, "
                          f"{configs}")


def verify_checkpoint(path: str | Path) -> None:
    """DiHT names its checkpoints ``<name>_<sha256>.ckpt``: check the file against that digest."""
    path = Path(path)
    m = re.search(r"_([0-9a-f]{64})\.ckpt$", path.name)
    if m is None:
        return
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != m.group(1):
        raise ValueError(f"{path}: SHA256 {h.hexdigest()} does not match the one in its name")


def create_model(name: str, pretrained: str | None = None, device: str = "cpu", **model_kwargs):
    """An open_clip model, its eval preprocess and tokenizer.

    name: any open_clip config name (``ViT-B-32``, ...) or one of ours (``diht-tiny-vit``).
    Weights only ever come from local paths.

    pretrained: a local checkpoint: ours (a plain open_clip state dict), open_clip's, or DiHT's released
    ones (raw OpenAI-CLIP-layout state dicts, GELU, loaded with open_clip's non-QuickGELU configs
    ``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``; their SHA256 is verified). A file without a
    logit bias loaded with ``init_logit_bias`` starts the bias there (open_clip's loader would start it at 0).
    """
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model config {name!r}; known: ours {[p.stem for p in CONFIG_DIR.glob('*.json')]} "
                         "plus open_clip's (open_clip.list_models())")
    if pretrained is not None and not Path(pretrained).exists():
        raise FileNotFoundError(f"checkpoint not found: {pretrained}")
    bias_init = None  # a bias asked for that the file lacks (an InfoNCE model warm-starting a sigmoid run)
    if pretrained is not None:
        verify_checkpoint(pretrained)
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if "logit_bias" in state:  # trained with the sigmoid loss: the model carries a bias
            model_kwargs.setdefault("init_logit_bias", 0.0)
        else:
            bias_init = model_kwargs.get("init_logit_bias")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                 **model_kwargs)
    if bias_init is not None:
        with torch.no_grad():
            model.logit_bias.fill_(bias_init)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


class ConceptHeads(nn.Module):
    """Two linear heads on the image embedding: objects and attributes (concept distillation)."""

    def __init__(self, embed_dim: int, n_objects: int, n_attributes: int):
        super().__init__()
        self.objects = nn.Linear(embed_dim, n_objects)
        self.attributes = nn.Linear(embed_dim, n_attributes)

    def forward(self, image_features: torch.Tensor):
        return self.objects(image_features), self.attributes(image_features)
