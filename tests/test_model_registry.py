"""The MLflow model registry entry of a trained model: registered, loaded back, same embeddings."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from diht_core.models import ConceptHeads, create_model
from diht_core.config import ParamsError, validate_params
from tasks._registry import register_trained_model, registered_model_name


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store, artifacts in tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = mlflow.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())
    yield exp
    mlflow.set_tracking_uri(None)


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_registered_model_loads_back_with_the_same_features(tmp_path, store):
    import mlflow
    from PIL import Image

    torch.manual_seed(0)
    model, preprocess, tokenizer = create_model("diht-tiny-vit")
    model.eval()
    models = tmp_path / "models"
    models.mkdir()
    torch.save(model.state_dict(), models / "model.pt")
    torch.save(ConceptHeads(model.visual.output_dim, 3, 4).state_dict(), models / "heads.pt")
    params = validate_params({"train": {"model": "diht-tiny-vit"}})
    with mlflow.start_run(experiment_id=store) as run:
        info = register_trained_model(params, models)
    assert info.registered_model_version == 1
    client = mlflow.MlflowClient()
    [mv] = client.search_model_versions("name='diht-tiny-vit'")
    assert int(mv.version) == 1 and mv.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).data.tags["diht.registered_model"] == "diht-tiny-vit/1"

    loaded = mlflow.pyfunc.load_model("models:/diht-tiny-vit/latest")  # as the README shows
    texts = ["a red circle", "two blue squares", "a green triangle near the top"]
    images = [_png((200, 30, 30)), _png((30, 30, 200))]
    with torch.no_grad():
        want_t = model.encode_text(tokenizer(texts), normalize=True).numpy()
        want_i = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images]),
                                    normalize=True).numpy()
    got_t = loaded.predict(pd.DataFrame({"text": texts}))
    got_i = loaded.predict(pd.DataFrame({"image": images}))
    assert got_t.shape == want_t.shape and got_i.shape == want_i.shape
    np.testing.assert_allclose(got_t, want_t, atol=1e-5)
    np.testing.assert_allclose(got_i, want_i, atol=1e-5)
    with pytest.raises(Exception, match="one column"):
        loaded.predict(pd.DataFrame({"caption": texts}))
    # the heads, the config name and the train params travel with the model
    local = mlflow.artifacts.download_artifacts("models:/diht-tiny-vit/1", dst_path=str(tmp_path / "dl"))
    assert {p.name for p in (tmp_path / "dl" / "artifacts").iterdir()} == {"model.pt", "heads.pt"}, local
    logged = mlflow.get_logged_model(info.model_id)
    assert logged.params["train.model"] == "diht-tiny-vit"
    assert mlflow.models.get_model_info("models:/diht-tiny-vit/1").metadata["open_clip_model"] == "diht-tiny-vit"


def test_registered_model_name_param():
    def name(v):
        return registered_model_name(validate_params({"mlflow": {"registered_model": v},
                                                      "train": {"model": "ViT-B-32"}}))

    assert name(None) == "diht-ViT-B-32"
    assert name(False) is None
    assert name("my-clip.v2") == "my-clip.v2"
    assert registered_model_name(validate_params({})) == "diht-tiny-vit"  # the prefix is not doubled
    for bad in (True, "", "a/b", "has space"):
        with pytest.raises(ParamsError, match="mlflow.registered_model"):
            name(bad)


def test_no_registration_when_disabled(tmp_path, store):
    import mlflow

    params = validate_params({"mlflow": {"registered_model": False}})
    with mlflow.start_run(experiment_id=store):
        assert register_trained_model(params, tmp_path) is None
    assert mlflow.MlflowClient().search_registered_models() == []


def test_alias_points_at_a_version_only_when_asked(tmp_path, store):
    """mlflow.set_alias false (a trial, dvc exp run): a new version, @champion untouched; true (the deployment
    `full`, make demo): @<mlflow.alias> points at the new version; the README loads models:/<name>@champion."""
    import mlflow

    (tmp_path / "model.pt").write_bytes(b"weights")  # registering copies the files; it never loads them
    client = mlflow.MlflowClient()

    def train(**mlflow_params):
        params = validate_params({"mlflow": mlflow_params})
        with mlflow.start_run(experiment_id=store) as run:
            info = register_trained_model(params, tmp_path)
        return info.registered_model_version, client.get_run(run.info.run_id).data.tags

    assert train()[0] == 1
    assert client.get_registered_model("diht-tiny-vit").aliases == {}
    version, tags = train(set_alias=True)
    assert int(client.get_model_version_by_alias("diht-tiny-vit", "champion").version) == version == 2
    assert tags["diht.model_alias"] == "diht-tiny-vit@champion"
    version, tags = train()  # a 20-step trial: a new version, the alias stays where it was
    assert version == 3 and "diht.model_alias" not in tags
    assert int(client.get_model_version_by_alias("diht-tiny-vit", "champion").version) == 2
    train(set_alias=True, alias="staging")
    aliases = client.get_registered_model("diht-tiny-vit").aliases
    assert {k: int(v) for k, v in aliases.items()} == {"champion": 2, "staging": 4}
    path = mlflow.artifacts.download_artifacts("models:/diht-tiny-vit@champion", dst_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "artifacts" / "model.pt").read_bytes() == b"weights", path


@pytest.mark.parametrize("bad", ["latest", "v3", "V12", "has space", "", "a.b"])
def test_alias_param_refuses_names_mlflow_reserves(bad):
    with pytest.raises(ParamsError, match="mlflow.alias"):
        validate_params({"mlflow": {"alias": bad}})
