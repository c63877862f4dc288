"""The model the evaluation stages score: benchmark.checkpoint, else the trained <paths.models>/model.pt."""

from __future__ import annotations

from pathlib import Path

from ..config import BenchmarkParams, Paths, TrainParams
from . import create_model


def evaluated(bench: BenchmarkParams, train: TrainParams, paths: Paths) -> tuple[str, Path]:
    """(open_clip config name, checkpoint): benchmark.model or train.model; benchmark.checkpoint or models/model.pt."""
    return bench.model or train.model, Path(bench.checkpoint or Path(paths.models) / "model.pt")


def load_trained(bench: BenchmarkParams, train: TrainParams, paths: Paths):
    """(model in eval mode, preprocess, tokenizer) of the evaluated checkpoint; FileNotFoundError says what to run."""
    name, path = evaluated(bench, train, paths)
    if not path.exists():
        hint = "" if bench.checkpoint else ": run the train stage first"
        raise FileNotFoundError(f"{path} not found{hint}")
    model, preprocess, tokenizer = create_model(name, pretrained=str(path))
    return model.eval(), preprocess, tokenizer
