"""Operations files agree with the code: prefect.yaml's deployments, the Makefile's servers, the DVC remote."""

from __future__ import annotations

import re
import subprocess

import yaml

from conftest import ROOT
from flows.diht import DEPLOYMENTS, deployment_parameters


def test_prefect_yaml_declares_the_served_deployments():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert list(deployments) == list(DEPLOYMENTS)
    for name, d in deployments.items():
        assert d["entrypoint"] == "flows/diht.py:diht", name
        assert d["parameters"] == deployment_parameters(name), name
        assert d["work_pool"]["name"] == "diht-local", name
    # local code: no build/push, the only pull step enters the project directory
    assert spec["build"] is None and spec["push"] is None
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": "{{ $DIHT_PROJECT_DIR }}"}}]


def test_every_deployment_runs_known_stages():
    from tasks import STAGES

    for name in DEPLOYMENTS:
        stages = deployment_parameters(name).get("stages")
        assert stages is None or set(stages) <= set(STAGES), name


def _dry_run(target: str) -> str:
    res = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "VENV": ".venv-none"})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_servers_bind_loopback_only():
    for target in ("serve", "worker", "ui"):
        cmds = _dry_run(target)
        hosts = re.findall(r"--host[ =](\S+)", cmds)
        assert hosts and set(hosts) == {"127.0.0.1"}, (target, hosts)
        assert "0.0.0.0" not in cmds, target


def test_make_worker_creates_the_pool_deploys_and_starts_a_worker():
    cmds = _dry_run("worker")
    for step in ("work-pool create diht-local --type process", "deploy --all", "worker start --pool diht-local",
                 "DIHT_PROJECT_DIR="):
        assert step in cmds, step


def test_dvc_default_remote_is_a_local_directory_in_the_project():
    from configobj import ConfigObj  # DVC's own config format

    cfg = ConfigObj(str(ROOT / ".dvc" / "config"))
    assert cfg["core"]["remote"] == "local"
    url = cfg['remote "local"']["url"]
    assert not re.match(r"^[a-z0-9]+://", url) and not url.startswith("/"), url  # relative: works in any clone
    assert (ROOT / ".dvc" / url).resolve() == (ROOT / ".state" / "dvc-remote").resolve()
