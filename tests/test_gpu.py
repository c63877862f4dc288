"""On a CUDA GPU (skipped where torch sees none, as in CI): training on the GPU equals training on the CPU in fp32,
bf16/fp16 autocast and torch.compile train close to it, torchrun joins NCCL, and the train stage's library entry
runs end to end on the GPU. One GPU: multi-rank NCCL is not tested here (tests/test_distributed.py tests the ranks'
arithmetic on gloo). Run: ``pytest -m gpu tests/test_gpu.py``."""

import numpy as np
import pytest
import torch
import yaml

from test_distributed import _mini_project, _run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(tmp_path, name, strategy, loss, accum=1, k=1, nproc=None, **env):
    """tests/helpers/dist_train.py (three SGD steps on a fixed batch stream) with DIHT_* settings."""
    return _run(tmp_path, tmp_path / f"{name}.pt", strategy, loss, accum, k, nproc=nproc, **env)


def _gap(a, b):
    """(largest loss difference, largest weight-update difference / largest update) of two runs."""
    moved = max((a["model"][n] - a["init"][n]).abs().max().item() for n in a["model"])
    upd = max(((b["model"][n] - b["init"][n]) - (a["model"][n] - a["init"][n])).abs().max().item()
              for n in a["model"])
    return float(np.max(np.abs(np.subtract(a["losses"], b["losses"])))), upd / moved


@pytest.mark.parametrize("loss,accum,k", [("hn-nce", 1, 1), ("sigmoid", 2, 2), ("infonce", 2, 1)])
def test_cuda_fp32_equals_cpu(tmp_path, loss, accum, k):
    """The same three steps on the GPU and on the CPU (TF32 off): the losses and weight updates agree to float
    rounding (sigmoid runs FFF mining and two captions per image; accum runs the cached-feature accumulation)."""
    cpu = _train(tmp_path, "cpu", "ddp", loss, accum, k, DIHT_DEVICE="cpu")
    gpu = _train(tmp_path, "gpu", "ddp", loss, accum, k, DIHT_DEVICE="cuda")
    dloss, dupd = _gap(cpu, gpu)
    print(f"\n[gpu] fp32 {loss} accum={accum} k={k}: loss gap {dloss:.2e}, update gap {dupd:.2e} of the largest")
    assert dloss < 1e-4 and dupd < 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_joins_nccl_and_equals_cpu(tmp_path, strategy):
    """torchrun with one rank on the GPU: the NCCL process group, the state-dict gathering (FSDP's too)."""
    cpu = _train(tmp_path, "cpu", strategy, "hn-nce", DIHT_DEVICE="cpu")
    gpu = _train(tmp_path, "gpu", strategy, "hn-nce", nproc=1, DIHT_DEVICE="cuda")
    dloss, dupd = _gap(cpu, gpu)
    print(f"\n[gpu] torchrun nccl {strategy}: loss gap {dloss:.2e}, update gap {dupd:.2e}")
    assert dloss < 1e-4 and dupd < 1e-3


@pytest.mark.parametrize("precision,loss", [("bf16", "hn-nce"), ("bf16", "sigmoid"), ("fp16", "hn-nce"),
                                            ("fp16", "infonce")])
def test_autocast_trains_like_fp32(tmp_path, precision, loss):
    """bf16 autocast, and fp16 with its grad scaler: finite losses near fp32's and updates that point the same
    way (cosine of the flattened updates)."""
    k = 2 if loss == "sigmoid" else 1
    ref = _train(tmp_path, "fp32", "ddp", loss, 1, k, DIHT_DEVICE="cuda")
    low = _train(tmp_path, precision, "ddp", loss, 1, k, DIHT_DEVICE="cuda", DIHT_PRECISION=precision)
    assert np.isfinite(low["losses"]).all()
    dloss, _ = _gap(ref, low)
    u_ref = torch.cat([(ref["model"][n] - ref["init"][n]).flatten().float() for n in ref["model"]])
    u_low = torch.cat([(low["model"][n] - low["init"][n]).flatten().float() for n in ref["model"]])
    cos = torch.nn.functional.cosine_similarity(u_ref, u_low, dim=0).item()
    print(f"\n[gpu] {precision} {loss}: loss gap {dloss:.2e}, update cosine {cos:.4f}, scale {low['grad_scale']}")
    assert dloss < 0.05 * max(abs(x) for x in ref["losses"]) and cos > 0.9


def test_fp16_sigmoid_departs_from_fp32_only_by_skipped_steps(tmp_path):
    """SigLIP's loss (bias -10, two captions per image) overflows fp16 gradients at the scaler's first scale
    (2^16): the scaler skips those steps and lowers its scale (history's grad_scale), as AMP does in open_clip;
    the loss before any update equals fp32's and nothing non-finite reaches the weights."""
    ref = _train(tmp_path, "fp32", "ddp", "sigmoid", 1, 2, DIHT_DEVICE="cuda")
    low = _train(tmp_path, "fp16", "ddp", "sigmoid", 1, 2, DIHT_DEVICE="cuda", DIHT_PRECISION="fp16")
    print(f"\n[gpu] fp16 sigmoid: losses {low['losses']} (fp32 {ref['losses']}), scale {low['grad_scale']}")
    assert abs(low["losses"][0] - ref["losses"][0]) < 0.01 * abs(ref["losses"][0])
    assert min(low["grad_scale"]) < 2.0 ** 16
    assert all(torch.isfinite(v).all() for v in low["model"].values())


def test_compile_equals_eager(tmp_path):
    eager = _train(tmp_path, "eager", "ddp", "hn-nce", DIHT_DEVICE="cuda")
    compiled = _train(tmp_path, "compiled", "ddp", "hn-nce", DIHT_DEVICE="cuda", DIHT_COMPILE="1")
    dloss, dupd = _gap(eager, compiled)
    print(f"\n[gpu] compile: loss gap {dloss:.2e}, update gap {dupd:.2e}")
    assert dloss < 1e-3 and dupd < 1e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fit_runs_on_cuda(tmp_path, monkeypatch, precision):
    """The train stage's library entry on real shards (JPEG decoding, the in-memory loader, distillation heads
    off): trains on the GPU and writes a plain open_clip file that loads on the CPU."""
    import open_clip

    from diht_core.config import validate_params
    from diht_core.models import register_configs
    from diht_core.train.run import fit

    proj = _mini_project(tmp_path, {"device": "cuda", "precision": precision, "steps": 8})
    monkeypatch.chdir(proj)
    metrics = fit(validate_params(yaml.safe_load((proj / "params.yaml").read_text())), proj / "ckpt")
    print(f"\n[gpu] fit {precision}: final loss {metrics['final_loss']:.4f}, device {metrics['device']}")
    assert metrics["device"] == "cuda" and np.isfinite(metrics["final_loss"])
    register_configs()
    open_clip.create_model("diht-tiny-vit", pretrained=str(proj / "models" / "model.pt"))
