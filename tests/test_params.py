import pytest
import yaml

from diht_core.config import Params, ParamsError, load_params, validate_params

from conftest import ROOT


def test_project_params_validate():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.pseudo_labels.top_k == 10
    from conftest import tiny_params
    validate_params(tiny_params())


@pytest.mark.parametrize("raw, key", [
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"cat_filter": {"min_confidence": 1.5}}, "cat_filter.min_confidence"),
    ({"cat_filter": {"spotter": "tesseract"}}, "cat_filter.spotter"),
    ({"benchmark": {"tasks": ["imagenet"]}}, "benchmark.tasks"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    assert key in str(err.value)


def test_unknown_key_says_so():
    with pytest.raises(ParamsError, match="unknown key"):
        validate_params({"download": {"num_trian": 10}})


def test_noise_fractions_must_fit():
    with pytest.raises(ParamsError, match="noise"):
        validate_params({"download": {"noise": {"junk": 0.6, "text_in_image": 0.3, "mismatched": 0.2}}})


def test_fewshot_shots_must_fit_pool():
    with pytest.raises(ParamsError, match="fewshot_per_class"):
        validate_params({"fewshot": {"shots": [20]}, "download": {"eval": {"fewshot_per_class": 16}}})


def test_overrides_and_bad_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 5}}))
    assert load_params(f, {"train": {"batch_size": 4}}).train.batch_size == 4
    assert load_params(f).train.steps == 5
    f.write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="YAML"):
        load_params(f)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_schema_defaults_are_the_defaults_of_params_yaml():
    """params.yaml restates the schema's defaults (the only defaults): every value it sets equals the default."""
    def walk(yaml_v, default_v, key):
        if isinstance(yaml_v, dict) and isinstance(default_v, dict):
            assert set(yaml_v) == set(default_v), key
            for k in yaml_v:
                walk(yaml_v[k], default_v[k], f"{key}.{k}")
        else:
            assert yaml_v == default_v, key

    walk(yaml.safe_load((ROOT / "params.yaml").read_text()), Params().model_dump(mode="json"), "params")


@pytest.mark.parametrize("key", [("train", "lr"), ("train", "weight_decay"), ("train", "hn_beta"),
                                 ("train", "sigmoid_bias_init"), ("teacher", "lr"), ("fewshot", "lr")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_numbers_must_be_finite(key, value):
    with pytest.raises(ParamsError) as err:
        validate_params({key[0]: {key[1]: value}}, "params.yaml")
    assert ".".join(key) in str(err.value)


def test_the_schema_is_a_leaf():
    """Importing the schema pulls in neither the task registry, torch nor pandas."""
    import subprocess
    import sys

    code = ("import sys, diht_core.config; "
            "print(sorted(m for m in ('torch', 'pandas', 'diht_core.eval.registry') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_duplicate_keys_are_refused_naming_the_key_and_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 1\ntrain:\n  steps: 3\n  lr: 0.01\n  steps: 4\n")
    with pytest.raises(ParamsError, match=r"p.yaml: duplicate key train.steps at line 5 \(first at line 3\)"):
        load_params(f)
    f.write_text("base: &b {steps: 3}\ntrain:\n  <<: *b\n  steps: 4\n")  # a merge key is no duplicate
    with pytest.raises(ParamsError, match="base: unknown key"):
        load_params(f)


def test_a_params_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("train: {model: café}\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=r"latin1.yaml: not UTF-8 text \(byte 18"):
        load_params(f)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"compile": "yes"}}, "train.compile"),
    ({"train": {"steps": "5"}}, "train.steps"),
    ({"train": {"steps": 5.0}}, "train.steps"),
    ({"train": {"lr": "0.1"}}, "train.lr"),
    ({"train": {"lr": True}}, "train.lr"),
    ({"cat_filter": {"text_spotting": 1}}, "cat_filter.text_spotting"),
    ({"benchmark": {"model": 3}}, "benchmark.model"),
])
def test_types_are_strict(raw, key):
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    assert key in str(err.value)


def test_an_int_is_a_float():
    p = validate_params({"train": {"lr": 1, "weight_decay": 0, "sigmoid_bias_init": -5}})
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)


@pytest.mark.parametrize("raw, message", [
    ({"train": {"model": "no-such-model"}}, "train.model: unknown model config 'no-such-model'"),
    ({"benchmark": {"model": "ViT-Q-99"}}, "benchmark.model: unknown model config 'ViT-Q-99'"),
    ({"teacher": {"arch": "no_such"}}, "teacher.arch: unknown timm model 'no_such'"),
    ({"teacher": {"arch": "open_clip:no-such"}}, "teacher.arch: unknown model config 'no-such'"),
])
def test_names_are_checked_before_any_work(raw, message):
    from diht_core.models import check_names

    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        check_names(validate_params(raw))


def test_known_names_pass():
    from diht_core.models import check_names

    for raw in ({"train": {"model": "ViT-B-32"}, "benchmark": {"model": "diht-tiny-vit"}},
                {"teacher": {"arch": "resnet18.a1_in1k"}}, {"teacher": {"arch": "open_clip:ViT-B-32"}},
                {"teacher": {"arch": "test_resnet"}}):
        check_names(validate_params(raw))


def test_exponent_floats_are_numbers(tmp_path):
    """`1e-3` (YAML 1.2's float, without a dot) is a number, as DVC's `-S train.lr=1e-3` writes it."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-2\n")
    p = load_params(path)
    assert (p.train.lr, p.train.weight_decay) == (0.001, 0.05)


def test_a_comparison_premise_takes_world_keys_and_train_keys():
    from diht_core.config import ParamsError, validate_params

    ok = {"component": "fff", "baseline": "sigmoid-2caps", "premise_off": {"same_scene_rate": 0.0,
                                                                            "train.batch_sampler": "distinct_scenes"}}
    assert validate_params({"ablation": {"comparisons": {"F": ok}}})
    for bad in ({"same_scene_rte": 0.0}, {"train.batch_sampler": "fancy"}, {"train.no_such_key": 1},
                {"train.steps": 5}):
        with pytest.raises(ParamsError, match="ablation"):
            validate_params({"ablation": {"comparisons": {"F": {**ok, "premise_off": bad}}}})
    # a train key is validated with each arm's config: 3 captions suit the sigmoid arms, not InfoNCE's
    assert validate_params({"ablation": {"comparisons": {"F": {**ok, "premise_off": {"train.captions_per_image": 3}}}}})
    with pytest.raises(ParamsError, match="comparisons.F.premise_off.*needs loss: sigmoid"):
        validate_params({"ablation": {"comparisons": {"F": {**ok, "component": "cat",
                                                             "premise_off": {"train.captions_per_image": 3}}}}})
    with pytest.raises(ParamsError, match="rdzv_endpoint"):
        validate_params({"teacher": {"launcher": "torchrun", "nnodes": 2, "rdzv_endpoint": "head"}})
