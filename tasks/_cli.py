"""What every command line shares (`diht`, `python -m tasks.<stage>`, `python -m flows.ablation`): --params and
--set, and the params validated before any work, a bad one refused in one line naming the key (exit code 2).
Imports only argparse until the params are read, so `--help` answers at once."""

from __future__ import annotations

import argparse
import sys

BAD_PARAMS_EXIT = 2  # argparse's own exit code for a bad command line


def add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", metavar="FILE", help="the params file (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one param of the file, VALUE read as YAML; repeatable: --set train.steps=20 "
                             "--set benchmark.tasks=[synthetic_shape]")


def fail(err: object, code: int) -> None:
    """`error: <err>` on stderr, then exit with `code`."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


def overrides_or_exit(args: argparse.Namespace) -> dict:
    """The nested overrides of --set (diht_core.config.parse_sets)."""
    from diht_core.config import ParamsError, parse_sets

    try:
        return parse_sets(args.sets)
    except ParamsError as err:
        fail(err, BAD_PARAMS_EXIT)


def params_or_exit(args: argparse.Namespace, more: dict | None = None):
    """The params of --params with --set applied (then `more`, overrides of the command's own, such as the
    ablation's quick variant), validated and their model names checked."""
    from diht_core.config import ParamsError, deep_merge, load_params
    from diht_core.models import check_names  # open_clip and timm: only once a command runs

    try:
        params = load_params(args.params, deep_merge(overrides_or_exit(args), more or {}))
        check_names(params)
    except ParamsError as err:
        fail(err, BAD_PARAMS_EXIT)
    return params
