"""The deploy kit starts as written: the Kubernetes overlays, compose, the image and the docs.

Each container that runs ``thoughtwire api`` or ``thoughtwire worker`` has its
environment built the way its runtime would build it, and put through the checks those
commands make before they serve: ``Settings.from_env`` accepts it, it names a Redis, and
``api`` without ``--insecure`` has authentication on. The same settings then size what
the manifests promise: grace periods above the drains, probes on real routes, proxy
timeouts above the pings, KEDA on the real jobs stream.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cluster, start_cluster
from tests.procs import free_port, wait_until
from thoughtwire.shared.keys import Keys
from thoughtwire.shared.settings import Settings, SettingsError

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "prod")
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
SCHEMAS = Path(__file__).parent / "schemas"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")

# What a stopping process may take beyond its drain settings (api/server.py,
# worker/runner.py): uvicorn waits DRAIN_TIMEOUT + 5 s after the frontend's drain
# window; a worker hands unfinished runs back within 5 s after DRAIN_TIMEOUT.
UVICORN_EXTRA = 5
HAND_BACK = 5


def yaml_module() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML comes with the test extra")


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


def api_port(argv: list[str]) -> int:
    """The port ``thoughtwire api`` listens on for this command line."""
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    return 8000


# --- the Kubernetes kit -------------------------------------------------------------


@functools.cache
def rendered(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (scripts/system-deps installs kubernetes-client)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/kubernetes/overlays/<overlay>``: every object of it."""
    return [o for o in yaml_module().safe_load_all(rendered(overlay)) if o]


def deployed(overlay: str) -> list[dict[str, Any]]:
    """What runs once an overlay is applied: its objects, and for prod the Secret an
    operator creates beside it (its template, ``overlays/prod/secret.template.yaml``)."""
    objects = render(overlay)
    template = KUSTOMIZE / "overlays" / overlay / "secret.template.yaml"
    if template.exists():
        objects.append(yaml_module().safe_load(template.read_text()))
    return objects


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


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


def pod_spec(o: Mapping[str, Any]) -> dict[str, Any]:
    return o["spec"] if o["kind"] == "Pod" else o["spec"]["template"]["spec"]


def thoughtwire_containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[str, list[str], dict[str, Any], dict[str, Any]]]:
    """``(where, argv, container, workload)`` for every container of the thoughtwire image."""
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(o)
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
                o,
            )


def roles(
    overlay: str,
) -> dict[str, tuple[str, list[str], dict[str, Any], dict[str, Any], Settings]]:
    """Each role's one container in an overlay: where, argv, container, workload, settings."""
    objects = deployed(overlay)
    found = {}
    for where, argv, container, workload in thoughtwire_containers(objects):
        env = container_env(container, Objects(objects), where)
        assert argv[1] not in found, f"two {argv[1]} containers"
        found[argv[1]] = (where, argv, container, workload, Settings.from_env(env))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_of_each_overlay_passes_the_start_up_checks(overlay):
    """Every `thoughtwire api`/`worker` container would start: 1 api and 1 worker Deployment.

    The api gets JWT_SECRET (without it `thoughtwire api` exits 2, "no authentication is
    configured"); the worker does not.
    """
    objects = deployed(overlay)
    found = []
    for where, argv, container, _ in thoughtwire_containers(objects):
        env = container_env(container, Objects(objects), where)
        role = check_start_up(argv, env, where)
        found.append(role)
        if role == "worker":  # least privilege: a worker never signs or checks a token
            assert "JWT_SECRET" not in env, where
        print(f"{overlay}: {where}: {' '.join(argv)}; env {sorted(env)}")
    assert sorted(found) == ["api", "worker"]


def test_prod_renders_no_secret_so_an_apply_never_overwrites_the_real_one():
    """The operator's Secret, created out of version control, survives every apply."""
    assert [o for o in render("prod") if o["kind"] == "Secret"] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_secrets_are_placeholders_that_say_so(overlay):
    """Whoever reads the kit can read its Secret: every secret value says it is not for use."""
    secret = one(deployed(overlay), "Secret", "thoughtwire")
    assert "placeholder-not-for-production" in secret["stringData"]["JWT_SECRET"]
    assert "placeholder" in secret["stringData"]["REDIS_URL"] or overlay == "dev"


def test_dev_runs_its_own_redis_and_prod_an_operated_sentinel():
    dev, prod = render("dev"), render("prod")
    redis = one(dev, "Deployment", "redis")
    assert redis["spec"]["replicas"] == 1
    one(dev, "Service", "redis")
    assert roles("dev")["api"][4].redis_url == "redis://redis:6379/0"
    # prod: no Redis of its own, not even a StatefulSet; REDIS_URL names the Sentinels.
    assert not [o for o in prod if "redis" in o["metadata"]["name"] and o["kind"] in WORKLOADS]
    assert not [o for o in prod if o["kind"] == "StatefulSet"]
    for role in ("api", "worker"):
        assert roles("prod")[role][4].redis_url.startswith("redis+sentinel://")


# --- Kubernetes' schemas, offline ---------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD schema that, like `kubectl apply`'s strict field validation, refuses
    unknown fields: each object with properties and no other rule for extra keys."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind)`` -> openAPIV3Schema of each vendored CRD (tests/schemas/keda)."""
    schemas = {}
    for path in (SCHEMAS / "keda").glob("*.yaml"):
        crd = yaml_module().safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # the API server's part
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_is_valid_kubernetes_and_keda(overlay):
    """Built-in kinds against Kubernetes' schema (kubernetes-validate, strict: no unknown
    fields); KEDA's kinds against the CRDs of KEDA v2.20.2, vendored, with jsonschema."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed"
    )
    jsonschema = pytest.importorskip("jsonschema")
    version = kubernetes_validate.latest_version()
    kinds = []
    for o in render(overlay):
        schema = crd_schemas().get((o["apiVersion"], o["kind"]))
        if schema is not None:
            jsonschema.validate(o, schema, cls=jsonschema.Draft7Validator)
        else:
            kubernetes_validate.validate(o, version, strict=True)
        kinds.append(o["kind"])
    print(f"{overlay}: {sorted(kinds)}")
    expected = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    expected |= {"Ingress", "ConfigMap"} | ({"Secret"} if overlay == "dev" else set())
    if overlay == "prod":
        expected |= {"ScaledObject", "TriggerAuthentication"}
    assert expected <= set(kinds)


def test_the_keda_schema_catches_a_mistake():
    """The vendored schema is really applied: a misspelt field or a trigger without a type fail."""
    jsonschema = pytest.importorskip("jsonschema")
    scaled = one(render("prod"), "ScaledObject", "thoughtwire-worker")
    schema = crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")]
    for spoil in (
        lambda s: s["spec"].update(minReplicas=1),  # it is minReplicaCount
        lambda s: s["spec"]["triggers"][0].pop("type"),
        lambda s: s["spec"].pop("scaleTargetRef"),
    ):
        spoilt = copy.deepcopy(scaled)
        spoil(spoilt)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(spoilt, schema, cls=jsonschema.Draft7Validator)


def test_the_kit_lists_every_manifest_it_holds():
    """No file of a kustomization's folder is left out of it (a forgotten manifest)."""
    yaml = yaml_module()
    folders = [p.parent for p in KUSTOMIZE.rglob("kustomization.yaml")]
    assert {f.name for f in folders} >= {"base", "dev", "prod", "keda"}
    for folder in folders:
        kit = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed = set(kit.get("resources", []))
        listed |= {p["path"] for p in kit.get("patches", []) if "path" in p}
        # A *.template.yaml is for the operator to fill in, never rendered.
        manifests = {p.name for p in folder.glob("*.yaml") if ".template." not in p.name}
        manifests -= {"kustomization.yaml"}
        assert manifests <= listed, f"{folder.relative_to(ROOT)}: {manifests - listed} unused"
    assert not list(DEPLOY.glob("*.yaml")) or (DEPLOY / "compose.yaml").exists()


# --- what the manifests promise, against the settings they set ----------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_drains(overlay):
    """A frontend: preStop sleep + DRAIN_WINDOW + (DRAIN_TIMEOUT + 5) inside its grace period;
    a worker: DRAIN_TIMEOUT + 5 (handing runs back). Settings are those the pods get."""
    found = roles(overlay)
    where, _, container, workload, settings = found["api"]
    grace = pod_spec(workload)["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + settings.drain_window + settings.drain_timeout + UVICORN_EXTRA
    print(f"{where}: grace {grace} s, needs {needed} s")
    assert pre_stop >= 3, "the endpoint needs a few seconds to leave the load balancers"
    assert grace > needed
    where, _, _, workload, settings = found["worker"]
    grace = pod_spec(workload)["terminationGracePeriodSeconds"]
    needed = settings.drain_timeout + HAND_BACK
    print(f"{where}: grace {grace} s, needs {needed} s")
    assert grace > needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_frontend_probes_hit_real_routes_on_the_served_port(overlay):
    from thoughtwire.api.app import create_app

    where, argv, container, _, settings = roles(overlay)["api"]
    paths = {getattr(r, "path", None) for r in create_app(settings).routes}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in paths, f"{where}: {kind} on {probe['path']}, not a route"
        port = ports.get(probe["port"], probe["port"])
        assert port == api_port(argv), f"{where}: {kind} on {port}, served on {api_port(argv)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_probe_gives_up_within_the_default_second(overlay):
    """A process busy with a burst answers a probe late; a 1 s timeout (Kubernetes'
    default) would move a frontend's sockets away or restart a worker for it."""
    for role, (where, _, container, _, _) in roles(overlay).items():
        for kind in ("readinessProbe", "livenessProbe"):
            timeout = container[kind].get("timeoutSeconds", 1)
            assert timeout >= 3, f"{where}: {role}'s {kind} times out after {timeout} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_hit_the_metrics_port(overlay):
    """Workers serve /healthz and /readyz on THOUGHTWIRE_METRICS_PORT."""
    where, _, container, _, settings = roles(overlay)["worker"]
    if "metrics_port" not in Settings.model_fields:
        pytest.skip("workers have no THOUGHTWIRE_METRICS_PORT server yet")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    sources = "\n".join(
        p.read_text() for d in ("worker", "shared") for p in (ROOT / d).rglob("*.py")
    )
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = container[kind]["httpGet"]
        assert probe["path"] == path
        assert f'"{path}"' in sources, f"no worker code serves {path}"
        port = ports.get(probe["port"], probe["port"])
        assert port == settings.metrics_port, f"{where}: {kind} on {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_thoughtwire_pods_run_unprivileged_and_bounded(overlay):
    for where, _, container, workload in thoughtwire_containers(render(overlay)):
        pod = pod_spec(workload)["securityContext"]
        assert pod["runAsNonRoot"] and pod["runAsUser"] != 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False, where
        assert own["readOnlyRootFilesystem"] is True, where
        assert own["capabilities"]["drop"] == ["ALL"], where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_of_the_namespace_can_set_a_setting(overlay):
    """Kubernetes puts ``<SERVICE>_PORT=tcp://ip:port`` into every pod of a namespace for
    each Service there: one named ``thoughtwire-metrics`` (a ServiceMonitor's, say) would
    set THOUGHTWIRE_METRICS_PORT, and every frontend and worker would exit 2 on start."""
    with pytest.raises(SettingsError, match="THOUGHTWIRE_METRICS_PORT"):
        Settings.from_env({"THOUGHTWIRE_METRICS_PORT": "tcp://10.96.0.12:9100"})
    for where, _, _, workload in thoughtwire_containers(render(overlay)):
        assert pod_spec(workload).get("enableServiceLinks") is False, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_frontends_scale_on_cpu_and_leave_one_at_a_time(overlay):
    objects = deployed(overlay)
    hpa = one(objects, "HorizontalPodAutoscaler", "thoughtwire-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "thoughtwire-api"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = one(objects, "PodDisruptionBudget", "thoughtwire-api")
    deployment = one(objects, "Deployment", "thoughtwire-api")
    assert "replicas" not in deployment["spec"], "the HPA owns it; an apply would reset it"
    labels = deployment["spec"]["template"]["metadata"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_keeps_quiet_sockets_and_is_not_sticky(overlay):
    objects = deployed(overlay)
    ingress = one(objects, "Ingress", "thoughtwire")
    notes = ingress["metadata"]["annotations"]
    settings = roles(overlay)["api"][4]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{timeout}"]) > settings.ping_interval
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # SSE
    assert not [
        k for k in notes if "affinity" in k or "session-cookie" in k or "upstream-hash" in k
    ]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    service = one(objects, "Service", "thoughtwire-api")
    assert "sessionAffinity" not in service["spec"] or service["spec"]["sessionAffinity"] == "None"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "thoughtwire-api"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_keeps_metrics_off_the_public_side(overlay):
    """Every host that reaches the frontends sends ``/metrics`` to no Service: a scrape
    walks every socket of a frontend, so anyone could make them all do it at will."""
    objects = deployed(overlay)
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    for rule in one(objects, "Ingress", "thoughtwire")["spec"]["rules"]:
        paths = rule["http"]["paths"]
        blocked = [p for p in paths if p["path"] == "/metrics" and p["pathType"] == "Exact"]
        assert blocked, f"{overlay}: {rule.get('host')} passes /metrics to the frontends"
        assert blocked[0]["backend"]["service"]["name"] not in services


def test_keda_scales_workers_on_the_lag_of_the_real_jobs_stream():
    """The trigger reads the stream and group the workers use (shared/keys.py) under the
    prefix the workers are given, and scales the workers' Deployment on its lag."""
    objects = render("prod")
    scaled = one(objects, "ScaledObject", "thoughtwire-worker")
    _, _, _, workload, settings = roles("prod")["worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]
    keys = Keys(settings.key_prefix)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel-streams"  # prod's Redis is behind Sentinel
    meta = trigger["metadata"]
    assert (meta["stream"], meta["consumerGroup"]) == (keys.jobs, keys.jobs_group)
    assert int(meta["lagCount"]) > 0
    # The Sentinels KEDA asks are the ones REDIS_URL names, with its master set.
    url = settings.redis_url or ""
    assert url.endswith("/" + meta["sentinelMaster"])
    assert set(meta["addresses"].split(",")) == set(url.split("@")[1].split("/")[0].split(","))
    auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {t["parameter"] for t in auth["spec"]["secretTargetRef"]} == {
        "password",
        "sentinelPassword",
    }


def test_the_keda_component_names_dev_redis_in_full():
    """KEDA's operator connects from its own namespace: `redis:6379` would not resolve there."""
    yaml = yaml_module()
    scaled = yaml.safe_load((KUSTOMIZE / "components/keda/scaledobject.yaml").read_text())
    dev = yaml.safe_load((KUSTOMIZE / "overlays/dev/kustomization.yaml").read_text())
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["address"] == f"redis.{dev['namespace']}.svc.cluster.local:6379"
    assert trigger["metadata"]["stream"] == Keys().jobs


# --- compose ------------------------------------------------------------------------


def interpolate(value: str) -> str:
    """Compose's ``${NAME:?message}`` and ``${NAME:-default}``, with NAME unset: a required
    one stands for what the user exports (a placeholder), an optional one for its default."""

    def one_variable(match: re.Match[str]) -> str:
        _name, op, rest = match[1], match[2], match[3]
        return "exported-by-the-user-" * 3 if op == ":?" else rest

    return re.sub(r"\$\{(\w+)(:\?|:-)([^}]*)\}", one_variable, value)


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml_module().safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def compose_thoughtwire() -> Iterator[tuple[str, list[str], dict[str, str], dict[str, Any]]]:
    """``(service, argv, env, service)`` for each service of the thoughtwire image."""
    for name, service in compose_services().items():
        if not service.get("image", "").startswith("thoughtwire"):
            continue
        argv = ["thoughtwire", *(service.get("command") or image_argv()[1:])]
        env = {k: interpolate(str(v)) for k, v in service.get("environment", {}).items()}
        yield name, argv, env, service


def seconds_of(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"a duration in seconds: {duration}"
    return float(match[1])


def test_every_compose_service_passes_the_start_up_checks():
    """Two frontends and two workers that start, drain inside compose's stop grace period,
    and that nginx (mounting the shipped config) sends its upstream to."""
    found = []
    for name, argv, env, service in compose_thoughtwire():
        role = check_start_up(argv, env, name)
        settings = Settings.from_env(env)
        grace = seconds_of(service["stop_grace_period"])
        if role == "api":
            needed = settings.drain_window + settings.drain_timeout + UVICORN_EXTRA
        else:
            needed = settings.drain_timeout + HAND_BACK
            assert "JWT_SECRET" not in env, name
        assert grace > needed, f"{name}: stop_grace_period {grace} s, needs {needed} s"
        found.append((role, name, api_port(argv) if role == "api" else None))
    assert sorted(r for r, _, _ in found) == ["api", "api", "worker", "worker"]
    nginx = compose_services()["nginx"]
    assert any(v.startswith("./nginx/thoughtwire.conf:") for v in nginx["volumes"])
    conf = (DEPLOY / "nginx" / "thoughtwire.conf").read_text()
    servers = re.findall(r"^\s*server ([\w.-]+:\d+)", conf, re.M)
    assert sorted(servers) == sorted(f"{n}:{p}" for r, n, p in found if r == "api")


def test_compose_yaml_follows_the_compose_specification():
    """Against the Compose Specification's schema, vendored (tests/schemas/compose)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    compose = yaml_module().safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    compose["services"]["worker-1"]["stop_grace"] = "40s"  # a misspelt key is caught
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)


def test_compose_refuses_to_start_without_a_jwt_secret():
    """No secret is written in compose.yaml: JWT_SECRET must come from the user's shell."""
    for name, _, _, service in compose_thoughtwire():
        raw = service["environment"]
        if "JWT_SECRET" in raw:
            assert raw["JWT_SECRET"].startswith("${JWT_SECRET:?"), name


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
    found = [check_start_up(argv, env, " ".join(argv)) for argv, env in runs]
    assert sorted(found) == ["api", "worker"]


# --- the image ----------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_the_image_copies_what_its_package_links_to():
    """Every symlink in the copied packages points into something the Dockerfile copies.

    api/static/thoughtwire.js links to clients/js: without `COPY clients`, the wheel built
    in the image silently lacks the file and every frontend fails at start-up.
    """
    copied = [ROOT / m for m in re.findall(r"^COPY (\S+) \./\S*$", dockerfile(), re.M)]
    copied += [
        ROOT / name
        for line in re.findall(r"^COPY (.+) \./$", dockerfile(), re.M)
        for name in line.split()
    ]
    assert ROOT / "api" in copied
    for folder in [c for c in copied if c.is_dir()]:
        for link in (p for p in folder.rglob("*") if p.is_symlink()):
            target = link.resolve()
            assert any(target.is_relative_to(c) for c in copied), (
                f"{link.relative_to(ROOT)} links outside what deploy/Dockerfile copies"
            )


def test_the_image_is_pinned_locked_and_unprivileged():
    text = dockerfile()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*@sha256:[0-9a-f]{64}", base[1])
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], "a builder stage, then the runtime"
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.lock" in text
    assert "pip install --require-hashes -r /tmp/build.lock" in text
    assert "pip wheel --no-deps" in text and "--no-index /tmp/wheels/" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"PYTHONUNBUFFERED=1", text)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\"", text, re.M)
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text


def locked(path: Path) -> dict[str, str]:
    """``{name: version}`` of a pip-compile lock, each entry checked to carry hashes."""
    entries = re.split(r"\n(?=[A-Za-z])", path.read_text())
    pins = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if match:
            assert "--hash=sha256:" in entry, f"{path.name}: {match[1]} has no hash"
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_the_lock_pins_every_dependency_with_hashes():
    """requirements.lock holds each of pyproject's dependencies, and build.lock the build
    backend, each pinned with its hashes (pip refuses the whole lock otherwise)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked(DEPLOY / "requirements.lock")
    for requirement in project["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name and name[0].lower().replace("_", "-") in pins, requirement
    build = project["build-system"]["requires"]
    assert [re.split(r"[<>=!~;\[ ]", r)[0] for r in build] == list(locked(DEPLOY / "build.lock"))


def test_dockerignore_keeps_the_context_small_and_takes_what_is_copied():
    """An allow-list: what the Dockerfile copies goes in; .git, .venv, .env and tests do not."""
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip()]
    rules = [r for r in rules if not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.M):
        for name in source.split():
            assert name in allowed, f".dockerignore leaves out {name}, which the image copies"
    assert not allowed & {".git", ".venv", ".env", "tests", "bench"}


def healthcheck_module() -> Any:
    """deploy/healthcheck.py, the image's HEALTHCHECK, loaded from its file."""
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    return healthcheck


def test_the_healthcheck_asks_each_role_on_its_own_port(monkeypatch):
    healthcheck = healthcheck_module()
    monkeypatch.delenv("THOUGHTWIRE_METRICS_PORT", raising=False)
    assert healthcheck.port(image_argv()) == 8000
    assert healthcheck.port(["thoughtwire", "api", "--port", "8001"]) == 8001
    assert healthcheck.port(["thoughtwire", "up", "--port=9000"]) == 9000
    assert healthcheck.port(["thoughtwire", "worker"]) == 9100
    monkeypatch.setenv("THOUGHTWIRE_METRICS_PORT", "9200")
    assert healthcheck.port(["/usr/local/bin/python", "thoughtwire", "worker"]) == 9200


# --- the dashboard and its metrics contract -----------------------------------------


def contract() -> set[str]:
    """The metric names docs/operations.md's "Metrics" section lists."""
    section = OPERATIONS_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(thoughtwire_\w+)`", section, re.M))


def test_the_dashboard_charts_exactly_the_metrics_of_the_contract():
    dashboard = json.loads((DEPLOY / "grafana" / "thoughtwire.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"thoughtwire_\w+", e)
    }
    assert len(contract()) == 20
    assert used == contract()
    histograms = {m for m in used if re.search(r"_(seconds|seqs|size)$", m)}
    for name in histograms:  # quantiles from buckets, never a gauge's value
        assert any(f"{name}_bucket" in e for e in exprs), name


# --- the number KEDA scales on, from a real Redis -----------------------------------


def jobs_group(redis: Any, keys: Keys) -> dict[str, Any]:
    """XINFO GROUPS' entry for the workers' group: what KEDA's `lagCount` reads."""
    (group,) = [g for g in redis.xinfo_groups(keys.jobs) if g["name"] == keys.jobs_group.encode()]
    return group


@pytest.fixture(scope="module")
def small_cluster(redis_server, logdir) -> Iterator[Cluster]:
    """One frontend and one worker on a real Redis."""
    cluster = start_cluster(redis_server, logdir, frontends=1, workers=1)
    yield cluster
    cluster.stop()


def test_the_healthcheck_passes_on_a_live_frontend_and_fails_on_a_closed_port(
    small_cluster, monkeypatch
):
    """The image's HEALTHCHECK script, with PID 1's command line that of a frontend."""
    healthcheck = healthcheck_module()
    frontend = small_cluster.frontends[0]

    class Cmdline:
        def __init__(self, _path: str) -> None:
            pass

        def read_bytes(self) -> bytes:
            return "\0".join(["thoughtwire", "api", "--port", str(port)]).encode()

    monkeypatch.setattr(healthcheck, "Path", Cmdline)
    port = frontend.port
    assert healthcheck.main() == 0
    port = free_port()
    assert healthcheck.main() == 1


def test_the_jobs_lag_counts_waiting_jobs_and_stays_exact_as_workers_delete(
    small_cluster, redis_server
):
    """Jobs queued while no worker runs are the group's lag; once workers ran them (each
    acknowledged, then deleted, in whatever order they ended) the lag is 0, not unknown:
    a deletion behind the group's position leaves Redis able to count."""
    cluster = small_cluster
    keys = Keys(cluster.prefix)
    redis = redis_server.client()
    wait_until(lambda: redis.exists(keys.jobs), 10, "the workers' group")
    cluster.workers[0].stop()
    api = cluster.frontends[0].http
    for i in range(5):
        reply = httpx.post(f"{api}/v1/jobs", json={"prompt": f"queued {i}"}, timeout=10)
        assert reply.status_code == 202, reply.text
    assert jobs_group(redis, keys)["lag"] == 5
    cluster.add_worker()
    wait_until(lambda: redis.xlen(keys.jobs) == 0, 30, "the workers to run every job")
    group = jobs_group(redis, keys)
    print(f"after the runs: {group}")
    assert (group["lag"], group["pending"], group["entries-read"]) == (0, 0, 5)
