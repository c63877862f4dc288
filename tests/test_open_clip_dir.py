"""The trained model in open_clip's `local-dir:` layout loads in a Python that cannot import our code, and gives
the embeddings and logits our loader gives on the same images and captions."""

import json
import subprocess
import sys
import sysconfig

import numpy as np
import torch
from PIL import Image

from diht_core.models import create_model
from diht_core.models.open_clip_dir import write_open_clip_dir

CAPTIONS = ["a red circle", "two blue squares", "a green triangle on the left"]

# Run with -S (no site: the editable install's .pth that puts this project on sys.path is not read) and only the
# venv's site-packages on the path, from a folder without our code.
OPEN_CLIP_ONLY = """
import sys
sys.path[:] = [p for p in sys.path if p and 'site-packages' not in p] + sys.argv[1].split('|')
try:
    import diht_core
except ImportError:
    pass
else:
    raise SystemExit('diht_core is importable here: ' + diht_core.__file__)
import numpy as np, open_clip, torch
from PIL import Image
out = {}
for name in sys.argv[2:]:
    model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + name)
    tokenizer = open_clip.get_tokenizer('local-dir:' + name)
    images = torch.stack([preprocess(Image.open(f'img{i}.png')) for i in range(3)])
    with torch.no_grad():
        img, txt, *scale_bias = model.eval()(images, tokenizer(%r))
        scale, *bias = [t.detach() for t in scale_bias]
    out.update({name + '/images': images.numpy(), name + '/image_features': img.numpy(),
                name + '/text_features': txt.numpy(), name + '/logits': (scale * img @ txt.T + sum(bias)).numpy(),
                name + '/bias': np.array(float(sum(bias)))})
np.savez('out.npz', **out)
""" % (CAPTIONS,)


def load_with_open_clip_alone(project, *folders: str) -> dict:
    """Each folder loaded by `open_clip.create_model_and_transforms('local-dir:<folder>')` in a Python that cannot
    import diht_core, run in `project` on its img0..2.png: the preprocessed images, embeddings, logits, bias."""
    paths = sysconfig.get_paths()
    site = "|".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    proc = subprocess.run([sys.executable, "-S", "-c", OPEN_CLIP_ONLY, site, *folders], cwd=project,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(project / "out.npz"))


def write_images(folder) -> None:
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (80, 50), (37, 90)]):  # resized and cropped by the transform
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def _ours(model_name: str, checkpoint) -> dict:
    """What our loader (diht_core.models.create_model, as the evaluation stages use it) gives."""
    model, preprocess, tokenizer = create_model(model_name, pretrained=str(checkpoint))
    images = torch.stack([preprocess(Image.open(checkpoint.parents[1] / f"img{i}.png")) for i in range(3)])
    with torch.no_grad():
        img, txt, *scale_bias = model.eval()(images, tokenizer(CAPTIONS))
    scale, *bias = [t.detach() for t in scale_bias]
    return {"images": images, "image_features": img, "text_features": txt, "logits": scale * img @ txt.T + sum(bias)}


def assert_open_clip_alone_gives_ours(project, *folders: str, model_name: str = "diht-tiny-vit") -> dict:
    """open_clip alone on each <folder> gives what our loader gives on <folder>/model.pt; return open_clip's."""
    theirs = load_with_open_clip_alone(project, *folders)
    for name in folders:
        for key, value in _ours(model_name, project / name / "model.pt").items():
            np.testing.assert_allclose(theirs[f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-6, err_msg=key)
    return theirs


def _trained(folder, **model_kwargs) -> None:
    """models/model.pt and the local-dir layout beside it, as the train stage writes them (random weights)."""
    model, _, _ = create_model("diht-tiny-vit", **model_kwargs)
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pt")
    write_open_clip_dir(model.state_dict(), "diht-tiny-vit", folder)


def test_trained_model_loads_with_open_clip_alone(tmp_path):
    proj = tmp_path
    torch.manual_seed(0)
    _trained(proj / "models")
    _trained(proj / "sigmoid", init_logit_bias=-3.0)  # a sigmoid-loss model carries a bias: told by its weights
    config = json.loads((proj / "models" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == config["preprocess_cfg"]["size"] == 48
    assert "init_logit_bias" not in config["model_cfg"]
    assert sorted(p.name for p in (proj / "sigmoid").iterdir()) == [
        "model.pt", "open_clip_config.json", "open_clip_model.safetensors"]  # no temporary file left

    write_images(proj)
    theirs = assert_open_clip_alone_gives_ours(proj, "models", "sigmoid")
    assert float(theirs["models/bias"]) == 0.0 and float(theirs["sigmoid/bias"]) == -3.0
