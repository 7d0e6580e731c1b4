"""The deploy examples start as written: the Kubernetes kit and the docs' ``docker run`` lines.

Each container that runs ``thoughtwire api`` or ``thoughtwire worker`` has its
environment built the way its runtime would build it, and put through the checks those
commands make before they serve: ``Settings.from_env`` accepts it, it names a Redis, and
``api`` without ``--insecure`` has authentication on.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from thoughtwire.shared.settings import Settings

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ROLES = ("api", "worker")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")


def image_argv() -> list[str]:
    """The image's ENTRYPOINT and CMD, from deploy/Dockerfile."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert entrypoint and cmd, "the Dockerfile has an exec-form ENTRYPOINT and CMD"
    return [*json.loads(entrypoint[1]), *json.loads(cmd[1])]


def check_start_up(argv: list[str], env: Mapping[str, str], where: str) -> str:
    """What ``thoughtwire api``/``worker`` check before serving; returns the role."""
    assert argv[0] == "thoughtwire", f"{where}: runs {argv}"
    role = argv[1]
    settings = Settings.from_env(env)  # raises SettingsError, as the command exits 2
    assert settings.redis_url, f"{where}: `thoughtwire {role}` needs REDIS_URL"
    if role == "api" and "--insecure" not in argv:
        assert settings.auth_enabled, (
            f"{where}: `thoughtwire api` exits 2 without JWT_SECRET, JWT_PUBLIC_KEY or JWKS_URL"
        )
    return role


# --- the Kubernetes kit -------------------------------------------------------------


def render() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/``: every object of the kit."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (scripts/system-deps installs kubernetes-client)")
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extra")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


class Objects:
    """The rendered Secrets and ConfigMaps, by name: what a container's env refers to."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.data: dict[tuple[str, str], dict[str, str]] = {}
        for o in objects:
            if o["kind"] == "Secret":
                values = {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
                values.update(o.get("stringData", {}))
            elif o["kind"] == "ConfigMap":
                values = dict(o.get("data", {}))
            else:
                continue
            self.data[(o["kind"], o["metadata"]["name"])] = {k: str(v) for k, v in values.items()}

    def source(self, kind: str, ref: Mapping[str, Any], where: str) -> dict[str, str] | None:
        """The named Secret or ConfigMap; None if it is optional and missing."""
        found = self.data.get((kind, ref["name"]))
        assert found is not None or ref.get("optional"), (
            f"{where}: no {kind} {ref['name']!r} (the pod would not start)"
        )
        return found

    def key(self, kind: str, ref: Mapping[str, Any], where: str) -> str | None:
        """One key of a Secret or ConfigMap; None if it is optional and missing."""
        source = self.source(kind, ref, where) or {}
        value = source.get(ref["key"])
        assert value is not None or ref.get("optional"), (
            f"{where}: {kind} {ref['name']!r} has no key {ref['key']!r} (the pod would not start)"
        )
        return value


REFS = {"secretKeyRef": "Secret", "configMapKeyRef": "ConfigMap"}
SOURCES = {"secretRef": "Secret", "configMapRef": "ConfigMap"}


def container_env(container: Mapping[str, Any], objects: Objects, where: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom first, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for field, kind in SOURCES.items():
            if field in source:
                values = objects.source(kind, source[field], where) or {}
                env.update({source.get("prefix", "") + k: v for k, v in values.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        value_from = var.get("valueFrom", {})
        for field, kind in REFS.items():
            if field in value_from:
                value = objects.key(kind, value_from[field], where)
                if value is not None:
                    env[var["name"]] = value
        if "fieldRef" in value_from or "resourceFieldRef" in value_from:
            env[var["name"]] = "from-the-pod"
    return env


def thoughtwire_containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[str, list[str], dict[str, Any]]]:
    """``(where, argv, container)`` for every container of the thoughtwire image."""
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        spec = o["spec"] if o["kind"] == "Pod" else o["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            if not container["image"].split(":")[0].endswith("thoughtwire"):
                continue
            default = image_argv()
            command = container.get("command", default[:1])
            args = container.get("args", default[1:] if "command" not in container else [])
            yield (
                f"{o['kind']}/{o['metadata']['name']}/{container['name']}",
                [*command, *args],
                container,
            )


def test_every_container_of_the_kit_passes_the_start_up_checks():
    """Every `thoughtwire api`/`worker` container would start: 1 api and 1 worker Deployment.

    Before: the Secret held only REDIS_URL, and `thoughtwire api` exited 2 ("no
    authentication is configured"). Now the api gets JWT_SECRET; the worker does not.
    """
    rendered = render()
    objects = Objects(rendered)
    roles = []
    for where, argv, container in thoughtwire_containers(rendered):
        env = container_env(container, objects, where)
        role = check_start_up(argv, env, where)
        roles.append(role)
        if role == "worker":  # least privilege: a worker never signs or checks a token
            assert "JWT_SECRET" not in env, where
        print(f"{where}: {' '.join(argv)}; env {sorted(env)}")
    assert sorted(roles) == ["api", "worker"]


def test_the_kit_lists_every_manifest_in_deploy():
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extra")
    kit = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kit["resources"]) == manifests


def test_the_rendered_kit_is_valid_kubernetes():
    """Each rendered object against the Kubernetes schema, offline (strict: no unknown fields)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed"
    )
    version = kubernetes_validate.latest_version()
    for o in render():
        kubernetes_validate.validate(o, version, strict=True)


# --- the docs' docker run lines -----------------------------------------------------


def docker_runs(doc: str) -> Iterator[tuple[list[str], dict[str, str]]]:
    """``(argv in the container, env)`` for each `docker run` of the thoughtwire image.

    ``-e NAME`` takes NAME from an ``export`` earlier on the page, as a shell would;
    ``$(...)`` stands for whatever the command prints.
    """
    exported: dict[str, str] = {}
    for line in doc.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            exported[name] = "printed-by-a-command-" * 3 if value.startswith("$(") else value
        if not line.startswith("docker run "):
            continue
        words = shlex.split(line)[2:]
        env: dict[str, str] = {}
        while words and words[0].startswith("-"):
            flag = words.pop(0)
            takes_value = flag in ("-e", "--env", "-p", "--network", "--name", "-v")
            value = words.pop(0) if takes_value else ""
            if flag in ("-e", "--env"):
                name, equals, given = value.partition("=")
                env[name] = given if equals else exported.get(name, "")
        image, argv = words[0], words[1:]
        if image.split(":")[0] == "thoughtwire":
            yield ["thoughtwire", *(argv or image_argv()[1:])], env


def test_every_docker_run_line_passes_the_start_up_checks():
    """The docs' `docker run` lines start: one `api` (with JWT_SECRET), one `worker`."""
    runs = list(docker_runs(DEPLOY_DOC.read_text()))
    roles = [check_start_up(argv, env, " ".join(argv)) for argv, env in runs]
    assert sorted(roles) == ["api", "worker"]


def test_the_image_copies_what_its_package_links_to():
    """Every symlink in the copied packages points into something the Dockerfile copies.

    api/static/thoughtwire.js links to clients/js: without `COPY clients`, the wheel built
    in the image silently lacks the file and every frontend fails at start-up.
    """
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = [ROOT / m for m in re.findall(r"^COPY (\S+) \./\S*$", dockerfile, re.M)]
    copied += [
        ROOT / name
        for line in re.findall(r"^COPY (.+) \./$", dockerfile, re.M)
        for name in line.split()
    ]
    assert ROOT / "api" in copied
    for folder in [c for c in copied if c.is_dir()]:
        for link in (p for p in folder.rglob("*") if p.is_symlink()):
            target = link.resolve()
            assert any(target.is_relative_to(c) for c in copied), (
                f"{link.relative_to(ROOT)} links outside what deploy/Dockerfile copies"
            )
