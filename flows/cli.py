"""The `diht` command: run the pipeline or some of its stages, one stage alone, the benchmark summary, or serve the
deployments. Imports nothing heavy (torch, Prefect, MLflow) until a command runs, so `diht --help` answers at once.

    diht run                                      # every stage, in this process (what `make demo` runs)
    diht run --stages benchmark fewshot --set benchmark.tasks=[synthetic_shape]
    diht stage train --set train.steps=20         # one stage, as `python -m tasks.train` (what dvc.yaml runs)
    diht summary                                  # the benchmark table of the last run
    diht serve                                    # the deployments, for `prefect deployment run diht/<name>`
"""

from __future__ import annotations

import argparse
import sys

from tasks import STAGES
from tasks._cli import add_params_args, overrides_or_exit, params_or_exit

COMMANDS = {
    "run": "run the Prefect flow `diht` in this process: every stage, or --stages, in pipeline order, under one "
           "MLflow parent run",
    "stage": "run one stage alone (the same as `python -m tasks.NAME`)",
    "summary": "print the benchmark table of the last run (metrics/benchmark.json)",
    "serve": "serve the deployments full, filter-only, eval-only and ablation from this process, for "
             "`prefect deployment run diht/<name>` (needs a Prefect server: `make serve` starts one)",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="diht", description=__doc__.split("\n\n")[0],
                                  epilog="\n".join(__doc__.split("\n\n")[1].splitlines()),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "stage":
            cmd.add_argument("name", choices=STAGES, metavar="NAME", help=f"one of: {', '.join(STAGES)}")
        if name == "run":
            cmd.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                             help=f"run only these, in pipeline order, on the files earlier runs left; of: "
                                  f"{', '.join(STAGES)}")
        add_params_args(cmd)
    return top


def run(args: argparse.Namespace) -> None:
    from tasks._stage import check_run_inputs, exit_codes, set_env

    set_env()
    params = params_or_exit(args)
    stages = [s for s in STAGES if args.stages is None or s in args.stages]
    with exit_codes():
        check_run_inputs(stages, params)  # a missing input stops the run in one line, before Prefect starts
        from flows.diht import diht, summary

        out = diht(params_path=args.params, overrides=overrides_or_exit(args), stages=args.stages)
    print(f"\ndiht run: {', '.join(out['stages'])} done; MLflow parent run {out['parent_run_id']}")
    if "benchmark" in out["stages"]:
        print(summary(params))


def stage(args: argparse.Namespace) -> None:
    from importlib import import_module

    from tasks._stage import stage_cli

    stage_cli(args.name, import_module(f"tasks.{args.name}").body, args)


def show_summary(args: argparse.Namespace) -> None:
    from flows.diht import summary
    from tasks._cli import fail

    params = params_or_exit(args)
    try:
        print(summary(params))
    except FileNotFoundError as err:
        fail(f"{err.filename} not found: run the benchmark stage first (diht run, or diht stage benchmark)", 66)


def serve(args: argparse.Namespace) -> None:
    from tasks._stage import set_env

    set_env()
    params_or_exit(args)
    from flows.diht import serve as serve_deployments

    serve_deployments(args.params, overrides_or_exit(args))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    {"run": run, "stage": stage, "summary": show_summary, "serve": serve}[args.command](args)


if __name__ == "__main__":
    main()
