"""What a stage's torchrun ranks share: the arguments a launch passes on (``diht_core.launch.launch_torchrun``), the
params they load, rank 0's result file."""

from __future__ import annotations

import argparse
import json
import os

from diht_core.config import Params, deep_merge, load_params
from diht_core.data.files import atomic_write_text

from ._cli import add_params_args, overrides_or_exit
from ._stage import seed_everything, set_env


def rank_args(stage: str) -> tuple[Params, str | None]:
    """On a rank of `python -m tasks.<stage>` under torchrun: (the params, loaded from the same file with the same
    overrides as the launching stage; the file the launching machine's first rank writes its result to, None when
    torchrun was started by hand)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}")
    add_params_args(parser)  # --set too: a torchrun started by hand takes the stage CLI's command line
    parser.add_argument("--overrides", default="{}", help="JSON of nested overrides of the params file")
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    set_env()
    p = load_params(args.params, deep_merge(overrides_or_exit(args), json.loads(args.overrides)))
    seed_everything(p.seed)
    return p, args.result


def write_result(result: str | None, metrics: dict) -> None:
    """The launching machine's first rank writes its metrics to the launch's result file (rank 0 on one machine;
    other ranks, and torchrun started by hand, write nothing). Several machines: the teacher stages' counts, summed
    over every rank."""
    if result and os.environ.get("LOCAL_RANK", "0") == "0":
        atomic_write_text(result, json.dumps(metrics, indent=2))
