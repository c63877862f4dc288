"""Print pip's package sources as `uv pip install` arguments, so `make install` under uv installs what pip would.

uv does not read pip's configuration (pip.conf, PIP_* variables). This passes on what decides which files are
installed: index-url, extra-index-url, find-links, no-index, constraint, trusted-host and cert (as SSL_CERT_FILE,
printed first as an assignment for `env`). uv's index strategy is set to pip's (the best version across every
index). Run with the venv's python: ``env $(python tools/uv_install_args.py) uv pip install ...``.
"""
import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}


def pip_config() -> dict[str, list[str]]:
    """Every value pip's configuration gives each option (files and PIP_* variables), in pip's order, deduplicated."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    config: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option = key.rpartition(".")[2]
        for v in shlex.split(value)[0].split() if value else []:
            if v not in config.setdefault(option, []):
                config[option].append(v)
    return config


def uv_args(config: dict[str, list[str]]) -> list[str]:
    args = [f"SSL_CERT_FILE={config['cert'][-1]}"] if config.get("cert") else []
    args += ["uv", "pip", "install", "--index-strategy", "unsafe-best-match"]
    for option, flag in FLAGS.items():
        for value in config.get(option, []):
            args += [flag, value]
    if config.get("no-index", ["false"])[-1].lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


if __name__ == "__main__":
    print(shlex.join(uv_args(pip_config())))
