"""`uv pip install ARGS...` with pip's package sources, so `make install` under uv installs what pip would.

uv does not read pip's configuration (pip.conf, PIP_* variables). This passes on what decides which files are
installed: index-url, extra-index-url, find-links, no-index, constraint, trusted-host and cert (as SSL_CERT_FILE).
Sections as pip reads them for `pip install`: global, then install, then the PIP_* variables, the later replacing an
option the earlier set. uv's index strategy is set to pip's (the best version across every index).
Run with the venv's python, where uv is installed: ``python tools/uv_install_args.py --python .venv/bin/python -e .``
(``--print``: show the command instead of running it).
"""
import ast
import os
import shlex
import subprocess
import sys
from pathlib import Path

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
SECTIONS = ("global", "install", ":env:")  # pip's order for `pip install`: the later wins


def pip_config(listing: str) -> dict[str, list[str]]:
    """Each option's values from `pip config list` (lines ``section.option='value'``, the value Python's repr,
    several values separated by whitespace or newlines), for `pip install`."""
    by_section: dict[str, dict[str, list[str]]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if sep and section in SECTIONS:
            by_section.setdefault(section, {})[option] = str(ast.literal_eval(value)).split()
    config: dict[str, list[str]] = {}
    for section in SECTIONS:
        config.update(by_section.get(section, {}))
    return config


def uv_command(config: dict[str, list[str]], args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the uv command, the variables to add to its environment)."""
    uv = str(Path(sys.executable).with_name("uv"))
    cmd = [uv, "pip", "install", "--index-strategy", "unsafe-best-match"]
    for option, flag in FLAGS.items():
        for value in config.get(option, []):
            cmd += [flag, value]
    if config.get("no-index", ["false"])[-1].lower() in ("1", "true", "yes", "on"):
        cmd.append("--no-index")
    env = {"SSL_CERT_FILE": config["cert"][-1]} if config.get("cert") else {}
    return cmd + args, env


if __name__ == "__main__":
    show = "--print" in sys.argv
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    cmd, env = uv_command(pip_config(listing), [a for a in sys.argv[1:] if a != "--print"])
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]), flush=True)
    if not show:
        os.execve(cmd[0], cmd, {**os.environ, **env})
