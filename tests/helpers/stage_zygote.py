"""Runs pipeline stages as their CLIs do (`python -m tasks.<stage> --params P`), each in a child forked from this
process once it has imported the heavy libraries: a test can start and kill -9 many stage runs without paying the
interpreter's start-up each time. Protocol (JSON lines): stdin {"run": stage, "cwd", "params", "log"} -> stdout
{"pid"} (the child leads its own process group); stdin {"wait": pid} -> stdout {"rc"} (negative: the signal)."""

import importlib
import json
import os
import runpy
import sys
import threading
import traceback

PRELOAD = ("torch", "open_clip", "timm", "mlflow", "prefect", "pandas", "pyarrow.parquet", "webdataset", "spacy",
           "rapidocr_onnxruntime", "sklearn.linear_model", "scipy.stats", "matplotlib", "diht_core.models",
           "tasks._stage")


def _child(req: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.argv = [f"tasks.{req['run']}", "--params", req["params"]]
        runpy.run_module(f"tasks.{req['run']}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    reply = {"ready": True, "threads": threading.active_count()}  # forking is safe with one thread only
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                _child(req)
            try:
                os.setpgid(pid, pid)  # also here: the test may kill the group before the child ran a line
            except OSError:
                pass
            reply = {"pid": pid}
        else:
            reply = {"rc": os.waitstatus_to_exitcode(os.waitpid(req["wait"], 0)[1])}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
