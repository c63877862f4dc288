"""The MLflow pyfunc model of a trained checkpoint.
MLflow "models from code": this file is saved with the model."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class ClipEncoder(PythonModel):
    def load_context(self, context) -> None:
        """Rebuild the open_clip model from its config name (model_config["open_clip_model"]) and the logged state
        dict through diht_core.models.create_model (diht_core travels with the model as code)."""
        from diht_core.models import create_model

        self.model, self.preprocess, self.tokenizer = create_model(
            context.model_config["open_clip_model"], pretrained=context.artifacts["model"])
        self.model.eval()
        self.batch_size = int(context.model_config.get("batch_size", 64))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """A DataFrame with a `text` column (strings) or an `image` column (encoded image bytes: PNG, JPEG, ...)
        -> their L2-normalised embeddings, float32, one row per input row."""
        import torch
        from PIL import Image

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        columns = [c for c in ("text", "image") if c in model_input.columns]
        if len(columns) != 1:
            raise ValueError(f"expected one column, `text` (strings) or `image` (encoded image bytes); got "
                             f"{list(model_input.columns)}")
        values = list(model_input[columns[0]])
        out = []
        with torch.no_grad():
            for i in range(0, len(values), self.batch_size):
                chunk = values[i:i + self.batch_size]
                if columns[0] == "text":
                    feats = self.model.encode_text(self.tokenizer([str(t) for t in chunk]), normalize=True)
                else:
                    images = [self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk]
                    feats = self.model.encode_image(torch.stack(images), normalize=True)
                out.append(feats.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.visual.output_dim), np.float32)


mlflow.models.set_model(ClipEncoder())
