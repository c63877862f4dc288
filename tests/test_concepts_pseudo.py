import numpy as np
import pytest
import torch

from diht_core.concepts.vocabulary import build_vocabulary, multi_hot, sqrt_resampling_weights
from diht_core.config import ConceptParams
from diht_core.data.pseudo_labels import densify, load_all, save_shard, sparsify


def test_vocabulary_counts_min_count_and_max_size():
    objs = [["cat", "cat", "dog"], ["cat"], ["bird"], ["dog"]]
    attrs = [["red"], ["red", "big"], [], ["red"]]
    v = build_vocabulary(objs, attrs, ConceptParams(min_count=2, max_size=10))
    assert v["objects"] == {"cat": 2, "dog": 2}  # counted once per caption, bird dropped
    assert list(v["attributes"]) == ["red"]
    tiny = ConceptParams.model_construct(min_count=1, max_size=1)  # below the schema's range, for the library
    assert list(build_vocabulary(objs, attrs, tiny)["objects"]) == ["cat"]


def test_multi_hot_and_sqrt_weights():
    y = multi_hot([["a"], ["a"], ["a"], ["a"], ["b"], ["zzz"]], ["a", "b"])
    assert y.tolist() == [[1, 0]] * 4 + [[0, 1], [0, 0]]
    w = sqrt_resampling_weights(y)
    # concept a (4 samples) is drawn 4/sqrt(4)=2 times as often as b (1 sample, 1/sqrt(1))
    assert w[:4].sum() / w[4] == pytest.approx(2.0)
    assert w[5] == 0 and w.sum() == pytest.approx(1.0)


def test_sparsify_is_exact():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(20, 50, generator=g) * 3, -1)
    idx, val = sparsify(probs, 10)
    assert idx.dtype == np.int32 and val.dtype == np.float16 and idx.shape == (20, 10)
    assert np.allclose(val.astype(np.float32).sum(1), 1.0, atol=2e-3)
    assert (np.diff(val.astype(np.float32), axis=1) <= 0).all()  # order kept
    ref = probs.topk(10, dim=1)
    assert (idx == ref.indices.numpy()).all()
    assert np.allclose(val, (ref.values / ref.values.sum(1, keepdim=True)).numpy(), atol=1e-3)
    assert sparsify(probs[:, :4], 10)[0].shape == (20, 4)  # k clipped to the vocabulary


def test_densify_roundtrip(tmp_path):
    probs = torch.softmax(torch.randn(6, 9), -1)
    o, a = sparsify(probs, 3), sparsify(probs[:, :5], 2)
    save_shard(tmp_path / "0.npz", [f"k{i}" for i in range(6)], o, a)
    pl = load_all(tmp_path, 9, 5)
    assert pl["index"]["k4"] == 4
    assert torch.allclose(pl["objects"], densify(*o, 9))
    assert (pl["objects"] > 0).sum(1).tolist() == [3] * 6
    with pytest.raises(FileNotFoundError):
        load_all(tmp_path / "none", 9, 5)


def test_sqrt_weights_reject_conceptless_data():
    with pytest.raises(ValueError, match="no sample mentions"):
        sqrt_resampling_weights(np.zeros((3, 2), dtype=np.float32))
