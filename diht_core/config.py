"""The params schema: params.yaml validated once, before any work; errors name the key. Its defaults are the
only defaults; the library takes its section objects directly."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .eval.catalog import task_names


class ParamsError(ValueError):
    """A params file that is unreadable or does not match the schema."""


class _Strict(BaseModel):
    # unknown keys refused, numbers finite, no coercion (compile: "yes" is refused; an int is a float)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


URL_LIST_FORMATS = ("tsv", "csv", "parquet", "txt")
_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}


def infer_format(path: str | Path) -> str | None:
    """A URL list's format from its file name (compression suffixes such as .gz are looked through)."""
    for s in reversed([s.lower() for s in Path(path).suffixes]):
        if s in _SUFFIXES:
            return _SUFFIXES[s]
    return None


def check_hn_nce(alpha: float, beta: float) -> None:
    """HN-NCE's ranges, for the schema and the loss alike."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"HN-NCE alpha must lie in (0, 1] (it scales the positive term), got {alpha}")
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"HN-NCE beta must be a finite number >= 0 (0 = uniform negative weights), got {beta}")


Fraction = Field(ge=0.0, le=1.0)


class Paths(_Strict):
    data: str = "data"
    models: str = "models"
    metrics: str = "metrics"
    plots: str = "plots"


class MLflowParams(_Strict):
    tracking_uri: str | None = None
    experiment: str = Field(default="diht", min_length=1)
    # the model registry entry of each trained model: null: diht-<train.model>; false: none; or a name
    registered_model: str | Literal[False] | None = None
    # the registry alias the train stage points at its new version, only when set_alias is true (the deployment
    # `full`, `make demo`, `diht run --set mlflow.set_alias=true`): a trial run never becomes @champion
    alias: str = Field(default="champion", pattern=r"^[A-Za-z0-9_-]{1,255}$")  # MLflow's alias names
    set_alias: bool = False

    @field_validator("alias")
    @classmethod
    def _alias(cls, v):
        if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError("'latest' and v<number> are reserved by MLflow (they name versions); pick another alias")
        return v

    @field_validator("registered_model", mode="before")
    @classmethod
    def _model_name(cls, v):
        if v is True:
            raise ValueError("true is not a name: null for the default name diht-<train.model>, false for none")
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", v):
            raise ValueError("a registered model name is 1-255 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit (false: register nothing)")
        return v


class NoiseParams(_Strict):
    junk: float = Field(default=0.15, ge=0, le=1)
    text_in_image: float = Field(default=0.15, ge=0, le=1)
    mismatched: float = Field(default=0.10, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self):
        if self.junk + self.text_in_image + self.mismatched > 1:
            raise ValueError("noise fractions junk + text_in_image + mismatched must sum to <= 1")
        return self


class EvalSplitParams(_Strict):
    per_class: int = Field(default=40, ge=2)
    retrieval_images: int = Field(default=200, ge=10)
    vqa_questions: int = Field(default=300, ge=10)
    fewshot_per_class: int = Field(default=16, ge=1)
    compositional_items: int = Field(default=400, ge=10)  # synthetic_compositional: image + true/swapped caption


JUNK_KINDS = ("noun_phrase", "product_listing", "painted_text_only", "template")


class JunkMix(_Strict):
    """Shares of the diverse junk captions' kinds (download.world.junk_mix); they must sum to 1."""
    noun_phrase: float = Field(default=0.35, ge=0, le=1)        # "red star icon png": no action
    product_listing: float = Field(default=0.30, ge=0, le=1)    # "SALE 2x blue square cushion": things not shown
    painted_text_only: float = Field(default=0.25, ge=0, le=1)  # the caption is the text painted in the image
    template: float = Field(default=0.10, ge=0, le=1)           # the old boilerplate ("stock photo id 1234")

    @model_validator(mode="after")
    def _sum(self):
        total = sum(getattr(self, k) for k in JUNK_KINDS)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"junk_mix shares must sum to 1, got {total:g}")
        return self


class WorldParams(_Strict):
    """The synthetic world's premises (diht_core/data/synthetic.py). The defaults are the web-like setting; each
    switch turns one premise off: uninformative false (CAT), junk_style templates (CAT's diverse junk), omit_prob 0
    (distillation), diverse_captions false (hard negatives), same_scene_rate 0 (FFF)."""
    uninformative: bool = True      # false: every training pair is clean (download.noise is ignored)
    junk_style: Literal["diverse", "templates"] = "diverse"  # templates: a handful of boilerplate captions
    junk_mix: JunkMix = JunkMix()   # diverse: the shares of the junk captions' kinds
    omit_prob: float = Field(default=0.5, ge=0, le=1)  # each colour/size word, and a third shape, left out
    teacher_label_noise: float = Field(default=0.0, ge=0, le=1)  # share of the teacher's labels made random
    diverse_captions: bool = True   # false: a few fixed templates (distinct images often share a caption)
    same_scene_rate: float = Field(default=0.1, ge=0, le=1)  # share of images re-rendering an earlier scene


class UrlListParams(_Strict):
    """download.source: url_list, img2dataset's conventions (diht_core/data/url_download.py)."""
    path: str | None = None                  # a TSV (CC3M), CSV, parquet (LAION) or txt list
    format: Literal["tsv", "csv", "parquet", "txt"] | None = None  # null: from the file's suffix
    url_col: str = Field(default="url", min_length=1)
    caption_col: str | None = "caption"
    threads: int = Field(default=64, ge=1, le=1024)
    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=0, ge=0, le=10)
    backoff: float = Field(default=1.0, ge=0)
    max_redirects: int = Field(default=5, ge=0, le=50)
    max_bytes: int = Field(default=20_000_000, ge=1024)
    max_pixels: int = Field(default=89_478_485, ge=1)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    image_size: int = Field(default=256, ge=8, le=8192)
    resize_only_if_bigger: bool = False
    encode_quality: int = Field(default=95, ge=1, le=100)
    shard_size: int = Field(default=10_000, ge=1)
    user_agent: str = Field(default="diht-pipeline/0.1 (img2dataset-style downloader)", min_length=1)
    respect_opt_out: bool = True
    # Redirects are followed only to http(s) URLs whose host resolves to public (global) addresses; a redirect to
    # loopback, private, link-local or reserved addresses, or to another scheme (file://, ftp://) fails with reason
    # unsafe_redirect. The list's own URLs are fetched as given (the list is the user's choice), so a list served
    # from 127.0.0.1 works; true: follow redirects into private addresses too (an intranet mirror; the tests'
    # loopback redirects). Other schemes are never followed.
    allow_private: bool = False
    # How the list's parts (runs of whole shards) are fetched: thread: one thread pool in this process (today's);
    # process: a pool of `processes` processes, each with its `threads`; dask: Prefect's DaskTaskRunner, a local
    # cluster of `processes` workers or the scheduler at dask_address (out_dir on a filesystem every worker sees).
    task_runner: Literal["thread", "process", "dask"] = "thread"
    processes: int = Field(default=2, ge=1, le=1024)  # process, dask: img2dataset's processes_count
    dask_address: str | None = None

    @model_validator(mode="after")
    def _format_known(self):
        if self.path and self.format is None and infer_format(self.path) is None:
            raise ValueError(f"download.url_list.format: cannot tell the format of {self.path!r} from its suffix; "
                             "set it to tsv, csv, parquet or txt")
        return self


class PrecleanParams(_Strict):
    """download.preclean: DiHT's LAION pre-cleaning (diht_core/data/preclean.py), decided from the list's columns
    before any request; optional image classifiers (a CLIP image tower + a small head, from local files) on the
    fetched images before CAT. Nothing of it runs unless enabled."""
    enabled: bool = False
    nsfw_column: str | None = "NSFW"             # rows whose value is in nsfw_values: reason nsfw
    nsfw_values: list[str] = ["NSFW"]
    watermark_column: str | None = "pwatermark"  # rows above max_watermark: reason watermark
    max_watermark: float = Field(default=0.5, ge=0, le=1)
    toxic_captions: bool = True                  # captions alt-profanity-check judges offensive: toxic_caption
    clip_model: str = "ViT-L-14"                 # open_clip architecture of the image classifiers' embedding
    clip_weights: str | None = None              # local open_clip checkpoint of clip_model (needed by the heads)
    nsfw_model: str | None = None                # local head on the CLIP embedding: p > max_nsfw is nsfw
    max_nsfw: float = Field(default=0.5, ge=0, le=1)
    watermark_model: str | None = None           # local head: p > max_watermark is watermark

    @model_validator(mode="after")
    def _heads_need_clip(self):
        if (self.nsfw_model or self.watermark_model) and not self.clip_weights:
            raise ValueError("download.preclean.clip_weights: required when nsfw_model or watermark_model is set")
        return self


class DownloadParams(_Strict):
    source: Literal["synthetic", "url_list"] = "synthetic"
    url_list: UrlListParams = UrlListParams()
    preclean: PrecleanParams = PrecleanParams()
    num_train: int = Field(default=4000, ge=16)
    shard_size: int = Field(default=500, ge=1)
    image_size: int = Field(default=128, ge=32, le=1024)
    noise: NoiseParams = NoiseParams()
    multi_caption: float = Field(default=0.3, ge=0, le=1)
    max_captions: int = Field(default=3, ge=2, le=10)
    teacher_samples: int = Field(default=2000, ge=16)
    eval: EvalSplitParams = EvalSplitParams()
    world: WorldParams = WorldParams()

    @model_validator(mode="after")
    def _url_list_needs_a_path(self):
        if self.source == "url_list" and not self.url_list.path:
            raise ValueError("download.url_list.path: required when download.source is url_list")
        return self


class CatFilterParams(_Strict):
    min_complexity: int = Field(default=1, ge=0)
    require_action: bool = True
    text_spotting: bool = True
    spotter: Literal["rapidocr", "doctr"] = "rapidocr"
    min_confidence: float | None = Field(default=None, ge=0, le=1)  # None: the spotter's calibrated threshold
    spotter_min_side: int | None = Field(default=None, ge=32)  # rapidocr: upscale smaller images to it; None: as is
    min_chars: int = Field(default=5, ge=1)
    parse_batch_size: int = Field(default=256, ge=1)
    workers: int = Field(default=2, ge=1)
    task_runner: Literal["process", "dask"] = "process"
    dask_address: str | None = None


class RecaptionParams(_Strict):
    """FFF's pseudo-captions: K captions per image from an image-to-text model (diht_core/models/captioners.py)."""
    enabled: bool = False                   # false: the stage is a no-op and train reads the CAT shards
    kind: Literal["blip2"] = "blip2"        # a captioner of CAPTIONERS (transformers' BLIP-2 for now)
    model_path: str | None = None           # a local folder of save_pretrained weights and processor
    num_captions: int = Field(default=5, ge=1, le=64)  # K generated captions per image (FFF: 5)
    do_sample: bool = True                  # nucleus sampling (diverse captions); false: beam search, K beams
    top_p: float = Field(default=0.9, gt=0, le=1)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=30, ge=1)
    min_new_tokens: int = Field(default=1, ge=0)
    batch_size: int = Field(default=32, ge=1)   # images per generate call
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on cuda, fp32 on cpu
    seed: int | None = Field(default=None, ge=0)  # sampling; null: the global seed

    @model_validator(mode="after")
    def _needs_a_model(self):
        if self.enabled and not self.model_path:
            raise ValueError("recaption.model_path: required when recaption.enabled is true (a local folder of "
                             "an image-to-text model, e.g. Salesforce/blip2-opt-2.7b saved with save_pretrained)")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"recaption.min_new_tokens={self.min_new_tokens} exceeds "
                             f"max_new_tokens={self.max_new_tokens}")
        return self


class ConceptParams(_Strict):
    min_count: int = Field(default=5, ge=1)
    max_size: int = Field(default=1000, ge=2)


class TeacherParams(_Strict):
    arch: str = "resnet18"      # a timm model, open_clip:<config> or torchvision:<name>
    weights: str | None = None
    preprocess: str = "auto"    # auto: the weights' own; or a torchvision weights config (IMAGENET1K_SWAG_E2E_V1)
    image_size: int = Field(default=64, ge=16)  # pre-trained here (preprocess auto): its input size
    pretrain_epochs: int = Field(default=3, ge=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    classifier_epochs: int = Field(default=60, ge=1)
    classifier_lr: float = Field(default=0.05, gt=0)
    # teacher inference (the training set's features here, the pseudo-labels in stage pseudo_labels)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # of the feature extraction; auto: a rank's GPU, else the CPU
    feature_batch_size: int = Field(default=256, ge=1)  # images per teacher forward pass
    launcher: Literal["none", "torchrun"] = "none"   # torchrun: nproc_per_node ranks, shard i on rank i % world
    nproc_per_node: int | Literal["auto"] = "auto"   # auto: one rank per GPU, else one per CPU core
    nnodes: int = Field(default=1, ge=1)  # machines of the launch; the others start the same torchrun by hand
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[^:\s]+:\d+$")  # host:port of this machine,
                                                                                # where the others meet it

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be >= 1 or auto")
        return v

    @model_validator(mode="after")
    def _nodes(self):
        if self.nnodes > 1 and (self.launcher != "torchrun" or not self.rdzv_endpoint):
            raise ValueError(f"nnodes={self.nnodes} needs launcher: torchrun and rdzv_endpoint (host:port of this "
                             f"machine)")
        return self


class PseudoLabelParams(_Strict):
    top_k: int = Field(default=10, ge=1)
    missing: Literal["error", "skip"] = "error"


class TrainParams(_Strict):
    model: str = "diht-tiny-vit"
    steps: int = Field(default=450, ge=1)
    batch_size: int = Field(default=128, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    loss: Literal["infonce", "hn-nce", "sigmoid"] = "hn-nce"  # DiHT's; plain CLIP is infonce without distillation
    hn_alpha: float = 1.0     # HN-NCE: scales the positive term in the denominator, in (0, 1]
    hn_beta: float = 0.5      # HN-NCE: hardness of the negative weights, >= 0 (0: InfoNCE); CoVR's reuse, see params
    hn_detach_weights: bool = False  # HN-NCE: the weights as constants (no gradient through them), see losses.py
    logit_scale_init: float | None = Field(default=None, gt=0, le=100)  # 1/temperature at step 0; None: the loss's
    # a warm start: the model file training starts from (a plain open_clip state dict, e.g. another run's
    # models/model.pt); "{seed}" in it becomes train.seed; logit_scale_init, when set, replaces the file's scale
    init_from: str | None = None
    fff_it_threshold: float | None = Field(default=None, ge=-1, le=1)  # sigmoid: FFF mining, image-text cosine
    fff_tt_threshold: float | None = Field(default=None, ge=-1, le=1)  # text-text cosine
    fff_ii_threshold: float | None = Field(default=None, ge=-1, le=1)  # image-image cosine
    fff_mining_start: int = Field(default=0, ge=0)
    sigmoid_bias_init: float = -10.0      # SigLIP's, chosen for batches of ~32k; smaller batches may want less
    lambda_obj: float = Field(default=0.5, ge=0)   # 0.5 is the paper's weight 1 on our scale (see params.yaml)
    lambda_attr: float = Field(default=0.5, ge=0)
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 uses a grad scaler on GPU
    grad_checkpointing: bool = False
    accum_steps: int = Field(default=1, ge=1)           # micro-batches per step, exact (cached features)
    loader: Literal["memory", "webdataset"] = "memory"
    workers: int = Field(default=2, ge=0)
    source: Literal["filtered", "raw"] = "filtered"  # raw: train on the unfiltered shards (no CAT filter)
    seed: int | None = Field(default=None, ge=0)      # model init and data order; null: the global seed
    resample: bool = False              # webdataset: draw shards with replacement (required with torchrun)
    captions_per_image: int = Field(default=1, ge=1)  # sigmoid: K captions of each image in a batch, all positives
    # distinct_scenes: no two images of one planted scene description in a batch (FFF's control world: no false
    # negatives at all); swap_families: each image's planted compositional hard negatives in its batch (HN-NCE's
    # premise); both need the synthetic data's planted scenes and loader memory
    batch_sampler: Literal["random", "distinct_scenes", "swap_families"] = "random"
    # an oracle filter (a diagnostic of the ablation, synthetic data only): the training pairs of these planted
    # noise kinds are left out, counted as oracle_<kind> (loader memory)
    drop_planted: list[Literal["junk", "text_in_image", "mismatched"]] = []
    compile: bool = False               # torch.compile the model
    device: Literal["auto", "cpu", "cuda"] = "auto"
    launcher: Literal["none", "torchrun"] = "none"    # torchrun: the stage starts nproc_per_node ranks
    nproc_per_node: int = Field(default=1, ge=1)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_nonfinite_steps: int = Field(default=0, ge=0)  # consecutive steps with a non-finite loss (skipped) before
                                                       # training stops with an error; 0: stop at the first

    @field_validator("drop_planted")
    @classmethod
    def _once_each(cls, v):
        if len(set(v)) < len(v):
            raise ValueError(f"names a planted kind twice: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        check_hn_nce(self.hn_alpha, self.hn_beta)
        if self.captions_per_image > 1 and self.loss != "sigmoid":
            raise ValueError(f"captions_per_image={self.captions_per_image} needs loss: sigmoid "
                             f"(several positives per image), got loss: {self.loss}")
        if self.launcher == "torchrun" and self.batch_size % self.nproc_per_node:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by nproc_per_node={self.nproc_per_node}")
        if self.batch_sampler != "random" and self.loader != "memory":
            raise ValueError(f"batch_sampler: {self.batch_sampler} needs loader: memory (the planted scenes of the "
                             "whole set)")
        if self.drop_planted and self.loader != "memory":
            raise ValueError("drop_planted needs loader: memory (an oracle filter of the in-memory set)")
        if self.launcher == "torchrun" and self.loader == "webdataset" and not self.resample:
            raise ValueError("loader: webdataset with launcher: torchrun needs resample: true "
                             "(ranks must see the same number of batches)")
        return self


class BenchmarkParams(_Strict):
    tasks: list[str] = ["synthetic_shape", "synthetic_colour", "synthetic_count", "synthetic_retrieval",
                        "synthetic_vqa", "synthetic_compositional"]
    data_root: str = "datasets"   # where the real tasks' data lives (diht_core/eval/registry.py)
    model: str | None = None       # open_clip config of the evaluated model; null: train.model
    checkpoint: str | None = None  # a local checkpoint (ours, open_clip's, DiHT's); null: models/model.pt
    batch_size: int = Field(default=256, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        known = set(task_names())
        unknown = [t for t in v if t not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; see docs/benchmark_tasks.md or "
                             "diht_core.eval.registry.list_tasks()")
        if not v:
            raise ValueError("at least one task")
        return v


MAX_SHOTS = 25  # the DiHT paper's k-shot curve on ImageNet goes up to 25 shots per class


class FewshotParams(_Strict):
    task: Literal["synthetic_shape", "synthetic_colour", "synthetic_count"] = "synthetic_shape"
    shots: list[int] = [0, 1, 2, 4, 8, 16]
    seeds: int = Field(default=3, ge=1)
    deltas: list[float] = [0.0, 0.25, 0.5, 1.0, 2.0]
    delta_bs: list[float] = [0.0, 0.5, 2.0]
    weight_decays: list[float] = [0.0, 1e-4, 1e-3, 1e-2]
    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=0.05, gt=0)

    @field_validator("shots")
    @classmethod
    def _shots(cls, v):
        if not v or any(k < 0 or k > MAX_SHOTS for k in v):
            raise ValueError(f"shots must be a non-empty list of integers from 0 (zero-shot) to {MAX_SHOTS} "
                             "(the DiHT paper's k-shot range)")
        return sorted(set(v))

    @field_validator("deltas", "delta_bs", "weight_decays")
    @classmethod
    def _nonneg(cls, v):
        if not v or any(x < 0 for x in v):
            raise ValueError("must be a non-empty list of numbers >= 0")
        return v


_NO_TRAIN = {"lambda_obj": 0, "lambda_attr": 0}
_SIGMOID = {"loss": "sigmoid", "sigmoid_bias_init": -5.0, "captions_per_image": 2, **_NO_TRAIN}


def split_premise(premise: dict) -> tuple[dict, dict]:
    """A comparison's premise: (overrides of download.world, overrides of train from its "train.<key>" keys)."""
    train = {k.removeprefix("train."): v for k, v in premise.items() if k.startswith("train.")}
    return {k: v for k, v in premise.items() if not k.startswith("train.")}, train


class ComparisonParams(_Strict):
    """A component against its baseline, in the world where its premise holds and in its control world."""
    component: str                      # a config of ablation.configs
    baseline: str                       # ... the same without the component
    premise_on: dict = {}               # overrides of download.world where the premise holds ("train.<key>": of
    premise_off: dict | None            # both arms' training, e.g. a batch sampler); premise_off: the control world,
                                        # given; null: none (a diagnostic, e.g. an oracle filter, run where it holds)

    @field_validator("premise_on", "premise_off")
    @classmethod
    def _world(cls, v):
        if v is None:
            return v
        world, train = split_premise(v)
        WorldParams.model_validate(world)   # known keys, valid values
        fixed = {"steps", "batch_size", "seed"} & set(train)  # the ablation's own for every run
        if fixed:
            raise ValueError(f"train.{sorted(fixed)[0]} is the ablation's own (ablation.steps, batch_size, seeds)")
        unknown = set(train) - set(TrainParams.model_fields)
        if unknown:
            raise ValueError(f"train.{sorted(unknown)[0]}: not a train param")
        return v   # the values: with each arm's config in AblationParams


class SweepParams(_Strict):
    """A config run at several values of one param, each against the config at its default value."""
    config: str                         # a config of ablation.configs
    key: str = Field(pattern=r"^(train|cat_filter|concepts|teacher|pseudo_labels|download)\.[a-z_.]+$")
    values: list[int | float] = Field(min_length=1)


class AblationParams(_Strict):
    """The ablation grid (flows/ablation.py, diht_core/eval/ablation.py): each comparison's two configs in its two
    worlds, the sweeps, every arm x seed trained at one budget and benchmarked."""
    seeds: list[int] = Field(default=[0, 1, 2, 3, 4], min_length=1)
    steps: int = Field(default=200, ge=1)          # samples seen = steps x batch_size, the same for every run
    batch_size: int = Field(default=128, ge=2)
    configs: dict[str, dict] = {                   # name -> overrides of `train`
        "baseline": {"source": "raw", "loss": "infonce", **_NO_TRAIN},
        "cat": {"loss": "infonce", **_NO_TRAIN},
        "cat+distill": {"loss": "infonce", "lambda_obj": 0.5, "lambda_attr": 0.5},
        "cat+hn-nce": {"loss": "hn-nce", "hn_beta": 0.5, **_NO_TRAIN},
        "diht": {"loss": "hn-nce", "hn_beta": 0.5, "lambda_obj": 0.5, "lambda_attr": 0.5},
        "sigmoid-2caps": dict(_SIGMOID),
        "fff": {**_SIGMOID, "fff_mining_start": 100, "fff_tt_threshold": 0.95, "fff_ii_threshold": 0.98},
        # oracle filters (diagnostics of CAT, configs/ablation_cat_oracle.yaml): the raw pairs less planted kinds
        "oracle-cat": {"source": "raw", "drop_planted": ["junk", "text_in_image"], "loss": "infonce", **_NO_TRAIN},
        "oracle-aligned": {"source": "raw", "drop_planted": ["mismatched"], "loss": "infonce", **_NO_TRAIN},
        "oracle-clean": {"source": "raw", "drop_planted": ["junk", "text_in_image", "mismatched"], "loss": "infonce",
                         **_NO_TRAIN},
    }
    comparisons: dict[str, ComparisonParams] = {
        "CAT": ComparisonParams(component="cat", baseline="baseline", premise_on={"uninformative": True},
                                premise_off={"uninformative": False}),
        "distillation": ComparisonParams(component="cat+distill", baseline="cat", premise_on={"omit_prob": 0.5},
                                         premise_off={"omit_prob": 0.0}),
        "HN-NCE": ComparisonParams(component="cat+hn-nce", baseline="cat", premise_on={"diverse_captions": True},
                                   premise_off={"diverse_captions": False}),
        "HN-NCE, hard batches": ComparisonParams(component="cat+hn-nce", baseline="cat",
                                                 premise_on={"train.batch_sampler": "swap_families"}, premise_off={}),
        "FFF mining": ComparisonParams(component="fff", baseline="sigmoid-2caps", premise_on={"same_scene_rate": 0.1},
                                       premise_off={"same_scene_rate": 0.0, "train.batch_sampler": "distinct_scenes"}),
    }
    sweeps: dict[str, SweepParams] = {
        "CAT complexity": SweepParams(config="cat", key="cat_filter.min_complexity", values=[1, 2, 3]),
        "pseudo-label top-k": SweepParams(config="cat+distill", key="pseudo_labels.top_k", values=[3, 5, 10, 20]),
        "HN-NCE beta": SweepParams(config="cat+hn-nce", key="train.hn_beta", values=[0.1, 0.25, 0.5, 1.0]),
    }
    also_run: list[str] = ["diht"]                 # configs run in the default world alone (reported, not tested)
    full: dict = {                                 # overrides of the whole params for the full grid (not --quick):
        "download": {"eval": {"per_class": 160, "retrieval_images": 800, "vqa_questions": 1200,  # eval splits 4x
                              "compositional_items": 1600}},  # the demo's: half its sampling error
    }
    quick: dict = {                                # overrides of the whole params for `--quick` (CI)
        "download": {"num_train": 240, "shard_size": 80, "teacher_samples": 160,
                     "eval": {"per_class": 6, "retrieval_images": 20, "vqa_questions": 20, "fewshot_per_class": 4,
                              "compositional_items": 20}},
        "cat_filter": {"workers": 1},
        "concepts": {"min_count": 2},
        "teacher": {"pretrain_epochs": 1, "batch_size": 32, "classifier_epochs": 3},
        "fewshot": {"shots": [0, 1, 2]},
        "train": {"warmup_steps": 2},
        "ablation": {"seeds": [0, 1], "steps": 6, "batch_size": 32, "configs": {"fff": {"fff_mining_start": 3}},
                     "also_run": [], "sweeps": {"CAT complexity": {"values": [1, 2]},
                                                "pseudo-label top-k": {"values": [5, 10]},
                                                "HN-NCE beta": {"values": [0.5, 1.0]}}},
    }

    @model_validator(mode="after")
    def _configs(self):
        runs = [(f"configs.{name}", ov) for name, ov in self.configs.items()]
        runs += [(f"comparisons.{n}.{world}", {**self.configs[config], **split_premise(getattr(c, world))[1]})
                 for n, c in self.comparisons.items() for world in ("premise_on", "premise_off")
                 for config in (c.component, c.baseline) if config in self.configs and getattr(c, world) is not None]
        for where, ov in runs:  # each arm's training as it runs
            try:
                TrainParams.model_validate({**ov, "steps": self.steps, "batch_size": self.batch_size})
            except ValidationError as err:
                raise ValueError(f"{where}: {err.errors()[0]['loc']} {err.errors()[0]['msg']}") from None
        named = [(f"comparisons.{n}.{role}", getattr(c, role)) for n, c in self.comparisons.items()
                 for role in ("component", "baseline")]
        named += [(f"sweeps.{n}.config", s.config) for n, s in self.sweeps.items()]
        named += [("also_run", c) for c in self.also_run]
        for where, config in named:
            if config not in self.configs:
                raise ValueError(f"{where}: {config!r} is not one of configs {list(self.configs)}")
        return self


class Params(_Strict):
    _source: tuple[str, dict] | None = PrivateAttr(default=None)  # (params file, overrides) it was loaded from
    seed: int = Field(default=0, ge=0)
    paths: Paths = Paths()
    mlflow: MLflowParams = MLflowParams()
    download: DownloadParams = DownloadParams()
    cat_filter: CatFilterParams = CatFilterParams()
    recaption: RecaptionParams = RecaptionParams()
    concepts: ConceptParams = ConceptParams()
    teacher: TeacherParams = TeacherParams()
    pseudo_labels: PseudoLabelParams = PseudoLabelParams()
    train: TrainParams = TrainParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    fewshot: FewshotParams = FewshotParams()
    ablation: AblationParams = AblationParams()

    @property
    def source(self) -> tuple[str, dict] | None:
        """(params file, overrides) these params were loaded from (load_params), for processes that load them
        again (torchrun ranks)."""
        return self._source

    def resolved_train(self) -> TrainParams:
        """The train section with its seed resolved (train.seed null: the global seed)."""
        return self.train if self.train.seed is not None else self.train.model_copy(update={"seed": self.seed})

    @model_validator(mode="after")
    def _cross(self):
        for name, sweep in self.ablation.sweeps.items():
            _check_sweep(self, f"ablation.sweeps.{name}", sweep.key, sweep.values)
        if max(self.fewshot.shots) > self.download.eval.fewshot_per_class:
            raise ValueError(
                f"fewshot.shots: max shot {max(self.fewshot.shots)} exceeds "
                f"download.eval.fewshot_per_class={self.download.eval.fewshot_per_class}"
            )
        return self


def _check_sweep(params: Params, where: str, key: str, values: list) -> None:
    """Every value of a sweep is a valid value of its param (a dotted key of the params)."""
    *parents, leaf = key.split(".")
    section = params
    for part in parents:
        section = getattr(section, part, None)
        if not isinstance(section, BaseModel):
            raise ValueError(f"{where}.key: {key!r} is not a section of the params")
    if leaf not in type(section).model_fields:
        raise ValueError(f"{where}.key: {key!r} is not a param")
    for v in values:
        try:
            type(section).model_validate({**section.model_dump(), leaf: v})
        except ValidationError as err:
            raise ValueError(f"{where}.values: {v!r} is not a valid {key}: {err.errors()[0]['msg']}") from None


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid params in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        lines.append(f"  {key}: {msg} (got {got!r})" if e["type"] != "missing" else f"  {key}: {msg}")
    return "\n".join(lines)


def validate_params(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err, source)) from None


def _no_duplicate_keys(node, prefix: str = "", seen_nodes: set | None = None) -> None:
    """Raise ParamsError on a key given twice in one mapping (YAML would keep the last silently)."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            name = f"{prefix}{key.value}" if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in lines:
                raise ParamsError(f"duplicate key {name} at line {key.start_mark.line + 1} "
                                  f"(first at line {lines[name]}); give each key once")
            lines[name] = key.start_mark.line + 1
            _no_duplicate_keys(value, f"{name}." if name else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _no_duplicate_keys(value, f"{prefix}{i}.", seen_nodes)


class _Loader(yaml.SafeLoader):
    """YAML 1.2's floats: `1e-3` is a number (PyYAML's YAML 1.1 rules read it as a string without a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(path: Path) -> object:
    """A YAML file's content: UTF-8, each key once (ParamsError naming the file, and the key, otherwise)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        _no_duplicate_keys(yaml.compose(text, Loader=_Loader))
        return yaml.load(text, Loader=_Loader)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read params.yaml, apply nested overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    raw = read_yaml(path) or {}
    if overrides:
        raw = deep_merge(raw, overrides)
    params = validate_params(raw, f"{path} with overrides" if overrides else str(path))
    params._source = (str(path), dict(overrides or {}))
    return params


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_params(params: Params, stage: str) -> dict:
    """Flat dict of the params a stage logs to MLflow."""
    sections = {
        "download": ["seed", "download"],
        "cat_filter": ["cat_filter"],
        "recaption": ["seed", "recaption"],
        "concepts": ["concepts"],
        "teacher": ["seed", "teacher"],
        "pseudo_labels": ["pseudo_labels"],
        "train": ["seed", "train"],
        "benchmark": ["benchmark"],
        "fewshot": ["seed", "fewshot"],
        "ablation": ["seed", "ablation"],
    }[stage]
    dump = params.model_dump()
    flat: dict = {}
    for s in sections:
        _flatten(dump[s], s, flat)
    return flat


def _flatten(v, prefix, out):
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(x, f"{prefix}.{k}", out)
    else:
        out[prefix] = v


def parse_sets(items: list[str] | tuple[str, ...] = ()) -> dict:
    """Nested overrides from the command line's `--set KEY=VALUE`s (`train.steps=20`, `benchmark.tasks=[a, b]`):
    each VALUE is read as YAML, as params.yaml is; the schema validates the result (load_params). ParamsError naming
    the item when it is not KEY=VALUE or sets a key twice."""
    out: dict = {}
    given: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not all(key.split(".")):
            raise ParamsError(f"--set {item}: expected KEY=VALUE with a dotted KEY, e.g. --set train.steps=20")
        clash = next((k for k in given if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise ParamsError(f"--set {item}: {key} is set twice (as {clash}); give each key once")
        given.append(key)
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {item}: not a YAML value ({getattr(err, 'problem', None) or err})") from None
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    return out
