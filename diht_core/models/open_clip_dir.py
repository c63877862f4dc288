"""The trained model in open_clip's `local-dir:` layout, loadable without our code:
``open_clip.create_model_and_transforms('local-dir:models')``.

open_clip reads `open_clip_config.json` (`model_cfg`: the architecture; `preprocess_cfg`: the image transform)
and the first weights file it looks for in the folder (`open_clip_model.safetensors` comes first). Only the CLIP
model goes there: the concept heads (models/heads.pt) are ours, not part of open_clip's model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import open_clip
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.transform import PreprocessCfg

from ..data.files import atomic_path, atomic_write_text
from . import register_configs


def open_clip_config(model_name: str, state: dict) -> dict:
    """`open_clip_config.json` of a model of config `model_name` with weights `state`: the architecture, and the
    preprocessing our loader (`create_model(name, pretrained=...)`) uses: open_clip's defaults at the model's size."""
    register_configs()
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown model config {model_name!r}")
    if "logit_bias" in state:  # trained with the sigmoid loss: the model carries a bias (its value is in the weights)
        model_cfg["init_logit_bias"] = 0.0
    size = model_cfg["vision_cfg"].get("image_size", PreprocessCfg.size)
    return {"model_cfg": model_cfg, "preprocess_cfg": {**asdict(PreprocessCfg()), "size": size}}


def write_open_clip_dir(state: dict, model_name: str, folder: str | Path) -> list[Path]:
    """Write the weights (safetensors) and `open_clip_config.json` into `folder`, each atomically (weights first:
    a config is never there without its weights); return the two paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = open_clip_config(model_name, state)
    weights = folder / HF_SAFE_WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    return [weights, atomic_write_text(folder / HF_CONFIG_NAME, json.dumps(config, indent=2) + "\n")]
