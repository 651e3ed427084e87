"""The container and Kubernetes files: linted, validated against the schemas, and in agreement with the code.

Images cannot be built here (no registry for base images), so these checks are what stands between a
typo and a failed deploy: hadolint, Kubernetes' own schemas, and the settings, port, probes and timings
compared with what laibao really reads and serves.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas
from tornado.ioloop import IOLoop

from laibao import config as laibao_config
from laibao.config import Config, load_config
from laibao.crypto import generate_aes_key, generate_token
from tests.harness import running_service

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SECRET_EXAMPLE = "secret.example.yaml"
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships.
K8S_VERSIONS = (kubernetes_schemas.all_versions()[0], kubernetes_schemas.latest_version())


def laibao_settings() -> set[str]:
    """Every environment variable laibao's configuration reads, taken from the code."""
    prefix = laibao_config.ENV_PREFIX
    return ({prefix + name.upper() for name in laibao_config._GLOBAL_PARSERS}
            | {prefix + name for name in laibao_config._ENV_BOT})


def default(name: str) -> Any:
    """The default of a Config field."""
    return next(f.default for f in fields(Config) if f.name == name)


def test_the_settings_list_is_read_from_the_configuration() -> None:
    # A guard for the checks below: the list is the real one, not empty or stale.
    names = laibao_settings()
    assert {"LAIBAO_WECOM_TOKEN", "LAIBAO_PORT", "LAIBAO_REDIS_URL", "LAIBAO_SHUTDOWN_GRACE"} <= names
    assert len(names) > 40


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name) or shutil.which(name, path="/usr/sbin")
    assert found, f"{name} is not installed: run `make test`"
    return found


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # From an empty directory with no HOME: no project or user .hadolint.yaml loosens the rules.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(path.parent)}
    return subprocess.run([_tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          cwd=path.parent, env=env, timeout=60, check=False)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = _hadolint(REPO / "Dockerfile")
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # The linter really checks: a careless Dockerfile fails it.
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install tornado\nCMD laibao serve\n")
    result = _hadolint(careless)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_agrees_with_the_code() -> None:
    steps = _dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) == 2 and all(re.match(r"python:3\.11-slim", stage) for stage in stages)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    last = {op: args for op, args in final}
    # The port laibao listens on, the probe it serves, its console script, a numeric non-root user.
    port = default("port")
    assert last["EXPOSE"] == str(port) and f"LAIBAO_PORT={port}" in last["ENV"]
    assert "/healthz" in last["HEALTHCHECK"] and "LAIBAO_PORT" in last["HEALTHCHECK"]
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "laibao = laibao.cli:main" in setup["options.entry_points"]["console_scripts"]
    assert json.loads(last["ENTRYPOINT"]) == ["laibao"] and json.loads(last["CMD"]) == ["serve"]
    assert last["USER"].isdigit() and last["USER"] != "0"
    assert last["STOPSIGNAL"] == "SIGTERM"
    # The build copies every package setup.cfg installs, and installs no extras (runtime only).
    packages = {name.strip().split(".")[0] for name in setup["options"]["packages"].split(",")}
    copied = {args.split()[0] for op, args in steps if op == "COPY" and "--from" not in args}
    assert packages <= copied
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert installs and not any("[" in args for args in installs)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", "tests"} <= set(ignored)


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_compose_runs_redis_mariadb_three_replicas_and_haproxy(tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "mariadb", "laibao", "haproxy"}
    laibao = services["laibao"]
    assert laibao["build"] == "." and laibao["deploy"]["replicas"] == 3
    assert laibao["env_file"] == ".env"
    env = laibao["environment"]
    assert set(env) <= laibao_settings()
    assert {"LAIBAO_REDIS_URL", "LAIBAO_MYSQL_URL"} <= set(env)
    # The drain fits in Docker's stop timeout (its default, 10 s, would not).
    grace = re.fullmatch(r"(\d+)s", laibao["stop_grace_period"])
    assert grace and int(grace[1]) > max(default("shutdown_grace"), default("shutdown_delay")) + 5
    assert {"redis", "mariadb"} <= set(laibao["depends_on"])
    # The MySQL URL names MariaDB's user and database.
    mariadb = services["mariadb"]["environment"]
    assert env["LAIBAO_MYSQL_URL"] == (f"mysql://{mariadb['MARIADB_USER']}:${{MARIADB_PASSWORD}}@mariadb:3306/"
                                       f"{mariadb['MARIADB_DATABASE']}")
    # HAProxy runs the shipped configuration, aimed at the service's port, and that configuration is valid
    # with exactly the environment compose gives it.
    haproxy = services["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    lb_env = haproxy["environment"]
    assert lb_env["LAIBAO_LB_SERVICE"] == f"laibao:{env.get('LAIBAO_PORT', default('port'))}"
    check = subprocess.run([_tool("haproxy"), "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")],
                           env={"PATH": os.environ.get("PATH", ""), **lb_env}, capture_output=True, text=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "server-template" in (REPO / "deploy" / "haproxy.cfg").read_text()


def _manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s, by file name (one object per file)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        documents = _yaml_documents(path)
        assert len(documents) == 1, path
        found[path.name] = documents[0]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    manifests = _manifests()
    for name, manifest in manifests.items():
        if name == "kustomization.yaml":
            continue
        # strict: a misspelt or misplaced field is an error, not silently ignored by the API server
        kubernetes_schemas.validate(manifest, version, strict=True)
    # The validator is real: a misspelt probe field fails it.
    broken = json.loads(json.dumps(manifests["deployment.yaml"]))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_schemas.ValidationError):
        kubernetes_schemas.validate(broken, version, strict=True)


def test_the_kustomization_applies_everything_but_the_secret_example() -> None:
    manifests = _manifests()
    kustomization = manifests.pop("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(manifests) - {SECRET_EXAMPLE})
    assert kustomization["images"][0]["name"] == _container(manifests)["image"].split(":")[0]


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = manifests["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_kubernetes_objects_agree_with_laibao_and_each_other(io_loop: IOLoop) -> None:
    manifests = _manifests()
    deployment, configmap = manifests["deployment.yaml"], manifests["configmap.yaml"]
    secret = manifests[SECRET_EXAMPLE]
    pod = deployment["spec"]["template"]
    container = _container(manifests)

    # Names: every variable is one laibao reads; the pod takes the ConfigMap and the Secret by name.
    settings = {**configmap["data"], **secret["stringData"]}
    assert set(settings) | {e["name"] for e in container["env"]} <= laibao_settings()
    assert set(configmap["data"]).isdisjoint(secret["stringData"])
    sources = {next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]}
    assert sources == {"configMapRef": configmap["metadata"]["name"], "secretRef": secret["metadata"]["name"]}
    # Secrets stay out of the ConfigMap.
    assert not {"LAIBAO_WECOM_TOKEN", "LAIBAO_WECOM_AES_KEY", "LAIBAO_DIFY_KEY", "LAIBAO_SECRET_KEY"} & set(
        configmap["data"])

    # The configuration the pod gets is one laibao accepts (the example's secret values replaced).
    values = {**configmap["data"], "LAIBAO_WECOM_TOKEN": generate_token(), "LAIBAO_WECOM_AES_KEY": generate_aes_key(),
              "LAIBAO_DIFY_KEY": "app-test-key", "LAIBAO_SECRET_KEY": "A" * 43 + "="}
    config = load_config(environ=values, dotenv=None)

    # Port: the container port is the one laibao listens on; probes and the Service use it by name.
    (port,) = container["ports"]
    assert port["containerPort"] == config.port
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/readyz", "/healthz")
    assert ready["port"] == live["port"] == port["name"]
    service_port = manifests["service.yaml"]["spec"]["ports"][0]
    assert service_port["targetPort"] == port["name"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.port)

    # The probes answer as expected from laibao itself with this configuration.
    with running_service(io_loop, "", configure=lambda dify_url: load_config(
            environ={**values, "LAIBAO_DIFY_URL": dify_url}, dotenv=None)) as service:
        for path, body in ((ready["path"], b"ready\n"), (live["path"], b"ok\n"),
                           (pod["metadata"]["annotations"]["prometheus.io/path"], None)):
            response = io_loop.run_sync(lambda path=path: service.wecom.http.fetch(
                service.wecom.base_url + path, raise_error=False))
            assert response.code == 200, (path, response.code)
            assert body is None or response.body == body

    # Stopping: preStop covers endpoint propagation, then the drain, all within the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 3 <= int(pre_stop[1]) <= 15
    stopping = int(pre_stop[1]) + max(config.shutdown_grace, config.shutdown_delay)
    assert pod["spec"]["terminationGracePeriodSeconds"] > stopping + 5

    # Three replicas, disruptions one at a time, scaling on CPU from three; all select the same pods.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert manifests["pdb.yaml"]["spec"]["selector"]["matchLabels"] == labels
    assert manifests["service.yaml"]["spec"]["selector"] == labels
    hpa = manifests["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"] and hpa["minReplicas"] == 3
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert manifests["pdb.yaml"]["spec"]["minAvailable"] == deployment["spec"]["replicas"] - 1
    # The HPA scales on a share of the CPU request: there must be one.
    assert container["resources"]["requests"]["cpu"]
