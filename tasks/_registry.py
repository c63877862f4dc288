"""The MLflow model registry: each trained model becomes a version of a registered pyfunc model."""

from __future__ import annotations

import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import diht_core
from diht_core.config import Params, stage_params

PYFUNC_CODE = Path(__file__).with_name("_clip_pyfunc.py")
REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "timm", "mlflow", "numpy", "pandas", "pillow")


def registered_model_name(params: Params) -> str | None:
    """params.mlflow.registered_model; null: diht-<train.model> (not doubled: diht-tiny-vit); false: None."""
    name = params.mlflow.registered_model
    if name is False:
        return None
    if name is None:
        model = params.train.model
        return model if model.startswith("diht-") else f"diht-{model}"
    return name


def _requirements() -> list[str]:
    """Pinned to this environment, so MLflow need not infer them (slow: it loads the model in a subprocess)."""
    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_clip_model(model_path: str | Path, heads_path: str | Path | None, open_clip_model: str,
                   registered_name: str | None = None, params: dict | None = None):
    """Log a checkpoint as a pyfunc model in the active run (registering it when registered_name is given).

    Returns MLflow's ModelInfo (registered_model_version set when registered).
    The logged model holds the plain open_clip state dict (models/model.pt), the concept heads (models/heads.pt),
    the open_clip config name and the train params; its code is tasks/_clip_pyfunc.py plus the diht_core package,
    so loading it needs only the pip requirements of REQUIREMENTS:

        mlflow.pyfunc.load_model("models:/diht-tiny-vit/1").predict(pd.DataFrame({"text": ["a red circle"]}))
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    artifacts = {"model": str(model_path)}
    if heads_path is not None and Path(heads_path).exists():
        artifacts["heads"] = str(heads_path)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
    )
    with warnings.catch_warnings():  # no input example on purpose: validating one loads the model again
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts=artifacts,
            code_paths=[str(Path(diht_core.__file__).parent)], model_config={"open_clip_model": open_clip_model},
            signature=signature, pip_requirements=_requirements(), registered_model_name=registered_name,
            params={k: v for k, v in (params or {}).items() if v is not None},
            metadata={"open_clip_model": open_clip_model, "state_dict": "open_clip"},
        )


def register_trained_model(params: Params, model_dir: str | Path):
    """The train stage's model (model_dir/model.pt + heads.pt) as a new version of the registered model, and
    `@<mlflow.alias>` pointed at it when mlflow.set_alias is true.

    The train stage calls it inside its MLflow run."""
    import mlflow

    name = registered_model_name(params)
    if name is None or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 registers
        return None
    model_dir = Path(model_dir)
    info = log_clip_model(model_dir / "model.pt", model_dir / "heads.pt", params.train.model, name,
                          stage_params(params, "train"))
    mlflow.set_tag("diht.registered_model", f"{name}/{info.registered_model_version}")
    if params.mlflow.set_alias:  # only when asked: `models:/<name>@<alias>` is what the README loads
        mlflow.MlflowClient().set_registered_model_alias(name, params.mlflow.alias, info.registered_model_version)
        mlflow.set_tag("diht.model_alias", f"{name}@{params.mlflow.alias}")
    return info
