"""The Kubernetes manifests (deploy/k8s/), checked without a cluster.

Each overlay is rendered as `kubectl kustomize` would (resources, namespace, strategic-merge
patches: the subset these files use), every object is validated against the Kubernetes API's
own schemas (kubernetes-validate, which ships them: nothing is fetched), the files pass yamllint,
and what the objects say is checked against what the servers really do: their settings and
ports, the health services the probes ask, the drain the grace period must cover, the metric
the autoscalers read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from clients.targets import DEFAULT_PORTS
from services.runtime.settings import ServerSettings
from services.runtime.trace_types import METRIC_STREAMS_ACTIVE
from services.serve import SERVICES

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("local", "secure", "gpu")
#: The oldest Kubernetes the manifests are for (the preStop sleep action), and the newest known.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVERS = ("asr", "tts", "llm")
#: What the Prometheus exporter calls the active-streams gauge.
STREAMS_METRIC = METRIC_STREAMS_ACTIVE.replace(".", "_")
_CLUSTER_SCOPED = {"Namespace"}
_MERGE_KEYS = ("name", "mountPath", "containerPort")


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization directory (resources, namespace, patches)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            target = _find(objects, doc["kind"], doc["metadata"]["name"])
            target.update(_merged(target, doc))
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def _merged(base: Any, patch: Any) -> Any:
    """Strategic merge: maps merge, lists of named items merge by name, other values replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merged(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and patch:
        key = next((k for k in _MERGE_KEYS if all(k in item for item in patch)), None)
        if key is not None and all(isinstance(item, dict) and key in item for item in base):
            merged_list = list(base)
            for item in patch:
                index = next((i for i, b in enumerate(base) if b[key] == item[key]), None)
                if index is None:
                    merged_list.append(copy.deepcopy(item))
                else:
                    merged_list[index] = _merged(base[index], item)
            return merged_list
    return copy.deepcopy(patch)


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


def _container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pod = _find(objects, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_api_schemas(rendered, version):
    _overlay, objects = rendered
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises, naming the field


def test_the_schema_check_is_not_vacuous():
    objects = render(K8S / "local")
    broken = copy.deepcopy(_find(objects, "Deployment", "asr"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    misspelt = copy.deepcopy(_find(objects, "Service", "asr"))
    misspelt["spec"]["clusterIp"] = "None"  # strict: an unknown field is an error
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, VERSIONS[0], strict=True)


def test_manifests_pass_yamllint():
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 100}\n"
        "  document-start: disable\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  braces: {max-spaces-inside: 1}\n"
        "  truthy: {check-keys: false}\n"
    )
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}: {problem.desc}"
        for path in files
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


def test_every_overlay_has_the_three_servers_and_the_bot(rendered):
    _overlay, objects = rendered
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name in SERVERS:
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert (kind, name) in kinds
    assert ("Deployment", "bot") in kinds and ("ConfigMap", "mesh-security") in kinds
    assert all(
        o["metadata"].get("namespace") == "nemotron" for o in objects if o["kind"] != "Namespace"
    )


@pytest.mark.parametrize("name", SERVERS)
def test_server_settings_ports_and_probes_are_what_the_server_does(rendered, name):
    _overlay, objects = rendered
    container = _container(objects, name)
    env = _env(container)
    kind = SERVICES[name]
    prefix = f"NEMOTRON_{name.upper()}_"
    fields = {f"{prefix}{field.upper()}" for field in kind.settings.model_fields}
    unknown = {k for k in env if k.startswith(prefix)} - fields
    assert not unknown, f"not settings of the {name} server: {unknown}"
    port, health_port = int(env[f"{prefix}PORT"]), int(env[f"{prefix}HEALTH_PORT"])
    assert port == DEFAULT_PORTS[name]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port and ports["health"] == health_port
    # kubelet's grpc probes speak neither TLS nor tokens: they ask the plaintext health port.
    probes = [container[p]["grpc"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(probe["port"] == health_port for probe in probes)
    service_names = kind.service(kind.settings(port=0), None).service_names
    assert container["readinessProbe"]["grpc"]["service"] in service_names
    service = _find(objects, "Service", name)["spec"]
    assert service["clusterIP"] == "None"  # headless: clients balance over the pods
    assert [p["port"] for p in service["ports"]] == [port]
    assert (
        service["selector"] == _find(objects, "Deployment", name)["spec"]["selector"]["matchLabels"]
    )


@pytest.mark.parametrize("name", SERVERS)
def test_grace_period_covers_the_prestop_and_the_servers_drain(rendered, name):
    _overlay, objects = rendered
    pod = _find(objects, "Deployment", name)["spec"]["template"]["spec"]
    container = _container(objects, name)
    drain_s = float(_env(container)[f"NEMOTRON_{name.upper()}_SHUTDOWN_GRACE_S"])
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after the preStop; the server then drains, then releases its model.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5
    assert pod["terminationGracePeriodSeconds"] <= pre_stop_s + drain_s + 15


@pytest.mark.parametrize("name", SERVERS)
def test_disruption_budget_and_autoscaler_target_the_deployment_on_active_streams(rendered, name):
    overlay, objects = rendered
    labels = _find(objects, "Deployment", name)["spec"]["selector"]["matchLabels"]
    assert _find(objects, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == labels
    hpa = _find(objects, "HorizontalPodAutoscaler", name)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == STREAMS_METRIC
    limit = int(_env(_container(objects, name))[f"NEMOTRON_{name.upper()}_MAX_STREAMS"])
    assert 0 < int(metric["pods"]["target"]["averageValue"]) < limit, overlay
    env = _env(_container(objects, name))
    assert env["NEMOTRON_PROMETHEUS_HOST"] == "0.0.0.0"
    annotations = _find(objects, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["NEMOTRON_PROMETHEUS_PORT"]


def test_the_adapter_rule_serves_the_metric_the_autoscalers_read():
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(STREAMS_METRIC + "{")
    assert rule["name"]["as"] == STREAMS_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_bot_balances_over_the_headless_services(rendered):
    _overlay, objects = rendered
    env = _env(_container(objects, "bot"))
    for name in SERVERS:
        service = _find(objects, "Service", name)
        namespace = service["metadata"]["namespace"]
        port = service["spec"]["ports"][0]["port"]
        url = env[f"NVIDIA_{name.upper()}_URL"]
        assert url == f"dns:///{name}.{namespace}.svc.cluster.local:{port}"


def _security(objects: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_find(objects, "ConfigMap", "mesh-security")["data"])


@pytest.mark.parametrize("name", SERVERS)
def test_servers_start_with_each_overlays_security(rendered, name, monkeypatch):
    overlay, objects = rendered
    security = _security(objects)
    container = _container(objects, name)
    for key, value in {**security, **_env(container)}.items():
        monkeypatch.setenv(key, value)
    settings_cls: type[ServerSettings] = SERVICES[name].settings
    if overlay == "local":
        settings = settings_cls()
        assert settings.host == "0.0.0.0" and settings.insecure and not settings.uses_tls
        return
    # TLS and tokens, from files in the mounted secrets (missing here: the server says which).
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert security["NEMOTRON_TLS_CERT"].startswith(mounts["tls"] + "/")
    assert security["NEMOTRON_TOKEN_FILE"].startswith(mounts["tokens"] + "/")
    assert security["NEMOTRON_INSECURE"] == "false"
    with pytest.raises(ValueError, match="tls"):
        settings_cls()


def test_the_gpu_overlay_asks_a_gpu_for_each_server_and_none_for_the_bot():
    objects = render(K8S / "gpu")
    for name in SERVERS:
        container = _container(objects, name)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].startswith("nemotron-speech-gpu:")
        assert f"NEMOTRON_{name.upper()}_HOST" in _env(container)  # the base env is kept
    assert "nvidia.com/gpu" not in _container(objects, "bot")["resources"].get("limits", {})
    for name in SERVERS:
        assert (
            "nvidia.com/gpu" not in _container(render(K8S / "local"), name)["resources"]["limits"]
        )
