"""Offline checks of deploy/: no container engine and no cluster run on the team's machines, so
nothing there is built or started; instead every file is parsed and checked here.

- every YAML file parses; every Kubernetes manifest of a built-in kind validates (strict: no
  unknown field) against the Kubernetes schemas of K8S_VERSION (kubernetes-validate, offline),
  KEDA's ScaledObject against a schema of the fields used here, and the manifests refer to each
  other consistently (selectors, ConfigMaps, Secrets, the weights claim, probes, GPU);
- compose.yaml follows the Compose specification's rules these files need (image or build,
  healthchecks, secrets / configs / volumes / depends_on that exist, the worker's GPU);
- every CXR_CDS_* name in compose, Kubernetes and the Containerfiles is a setting the code
  reads, and the example configuration loads with the service's own loaders;
- every `cxr-cds ...` command line parses with the CLI's own argparse parser;
- the lock files are complete for pyproject.toml's dependencies and hash every package.
A deliberately broken manifest, compose file or ScaledObject is refused (tests below).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cds_service.config import Settings, load_ehr_clients, load_trusted_issuers
from cds_service.storage.ports import JOB_STATES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.33"  # the Kubernetes release the manifests are validated against
COMPOSE = DEPLOY / "compose.yaml"
CONTAINERFILES = {
    "web": DEPLOY / "web.Containerfile",
    "worker": DEPLOY / "worker.Containerfile",
    "orthanc": DEPLOY / "orthanc.Containerfile",
}
# Kinds with no schema in kubernetes-validate, checked by the tests below instead.
OWN_CHECKS = {"Kustomization", "ScaledObject"}
CUDA_PACKAGES = re.compile(r"^(torch|triton|nvidia-[a-z0-9.-]+|cuda-[a-z0-9.-]+)$")
CLI_COMMANDS = {"serve", "worker", "sandbox", "subscribe", "model"}  # what deploy/ runs


# -- helpers -------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@cache
def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.rglob("*.yaml")) for doc in documents(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d.get("kind") == kind}


@cache
def settings_read_by_code() -> set[str]:
    """CXR_CDS_* names the code uses as whole string literals (env.get("CXR_CDS_X"), ...),
    and NAME_FILE for the settings read with config._setting_or_file."""
    names: set[str] = set()
    for package in ("cds_service", "smart_app", "ehr_sandbox"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            names.update(re.findall(r"""["'](CXR_CDS_[A-Z0-9_]+)["']""", text))
            for name in re.findall(r"""_setting_or_file\(\s*env,\s*["'](CXR_CDS_\w+)["']""", text):
                names.add(f"{name}_FILE")  # a secret as a file: config._setting_or_file
    return names


def unknown_settings(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("CXR_CDS_")} - settings_read_by_code()


def cxr_cds_argvs(command: Any) -> Iterator[list[str]]:
    """Each `cxr-cds ...` argument list in a command: an exec list, or a shell line (sh -c)."""
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if words[:2] == ["sh", "-c"]:
        words = words[2:]
    if len(words) == 1:  # one shell line
        words = shlex.split(words[0])
    current: list[str] = []
    for word in [*words, "&&"]:
        if word not in {"&&", "||", ";"}:
            current.append(word)
            continue
        if current[:1] == ["exec"]:
            current = current[1:]
        if current[:1] == ["cxr-cds"]:
            yield current[1:]
        current = []


def cli_problem(argv: list[str]) -> str | None:
    """None when the CLI's own parser accepts `cxr-cds ARGV`, else why not."""
    from cds_service.cli import build_parser

    if not argv or argv[0] not in CLI_COMMANDS:
        return f"cxr-cds {' '.join(argv)}: not one of the commands deploy/ runs {CLI_COMMANDS}"
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return f"cxr-cds {' '.join(argv)}: refused by the CLI's argument parser"
    return None


def expand_defaults(value: str) -> str:
    """Compose interpolation with every variable unset: ${X:-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# -- YAML and Kubernetes -------------------------------------------------------------------
def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert COMPOSE in files and (K8S / "kustomization.yaml") in files
    for path in files:
        assert documents(path), f"{path}: no YAML document"


def validate_manifest(doc: dict[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError (or SchemaNotFoundError) for a bad manifest."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    kinds = set()
    for path, doc in manifests():
        kinds.add(doc["kind"])
        if doc["kind"] in OWN_CHECKS:
            continue
        try:
            validate_manifest(doc)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {location}: {exc}")
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    assert {"ConfigMap", "Secret", "PersistentVolumeClaim", "ScaledObject", "Job"} <= kinds


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c, d: c.update(imagePullPolice="Always"),  # misspelt field
        lambda c, d: d["spec"].update(replicas="two"),  # wrong type
        lambda c, d: c["readinessProbe"]["httpGet"].update(port={"name": "http"}),
    ],
    ids=["unknown-field", "wrong-type", "bad-probe-port"],
)
def test_a_broken_manifest_is_refused(break_it: Any) -> None:
    web = copy.deepcopy(by_kind("Deployment")["cxr-cds-web"])
    break_it(web["spec"]["template"]["spec"]["containers"][0], web)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(web)


def test_unknown_kind_or_api_version_is_not_silently_accepted() -> None:
    service = copy.deepcopy(by_kind("Service")["cxr-cds-web"])
    service["apiVersion"] = "v2"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_manifest(service)


def test_kustomization_lists_every_manifest_but_the_example_and_the_job() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    # Not applied by `kubectl apply -k`: placeholders, and a Job run once on purpose.
    assert on_disk - listed == {"secret.example.yaml", "jobs/model-fetch.yaml"}
    assert listed <= on_disk, f"listed but missing: {listed - on_disk}"
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"].rsplit(":", 1)[0]
        for _, d in manifests()
        if d["kind"] in {"Deployment", "Job"}
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert used == images


def pod_spec(name: str, kind: str = "Deployment") -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(kind)[name]["spec"]["template"]["spec"]
    return spec


def test_web_deployment_service_hpa_and_probes() -> None:
    web = by_kind("Deployment")["cxr-cds-web"]
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert web["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind("Service")["cxr-cds-web"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = web["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = by_kind("HorizontalPodAutoscaler")["cxr-cds-web"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cxr-cds-web",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_worker_requests_one_gpu_and_mounts_the_weights_read_only() -> None:
    spec = pod_spec("cxr-cds-worker")
    (container,) = spec["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1  # must equal the limit
    assert "ports" not in container and "readinessProbe" not in container  # serves no HTTP
    for name in ("cxr-cds-web", "cxr-cds-worker"):
        pod = pod_spec(name)
        weights = {v["name"]: v for v in pod["volumes"]}["weights"]
        assert weights["persistentVolumeClaim"]["readOnly"] is True
        assert weights["persistentVolumeClaim"]["claimName"] in by_kind("PersistentVolumeClaim")
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["weights"]["readOnly"] is True
        env = configmap_env()
        assert mounts["weights"]["mountPath"] == env["CXR_CDS_MODEL_DIR"]
    # The one writer: the fetch Job, which also writes the weights-hash cache.
    job = pod_spec("cxr-cds-model-fetch", "Job")
    assert "model info /models/cxr-llava" in " ".join(job["containers"][0]["args"])


def test_pods_run_as_non_root_with_a_read_only_root() -> None:
    for kind in ("Deployment", "Job"):
        for name in by_kind(kind):
            pod = pod_spec(name, kind)
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True


def test_pods_refer_to_configmaps_secrets_and_claims_that_exist() -> None:
    configmaps, claims = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim")
    secret = by_kind("Secret")["cxr-cds-secrets"]  # the example: same name and keys
    for kind in ("Deployment", "Job"):
        for name in by_kind(kind):
            pod = pod_spec(name, kind)
            for volume in pod["volumes"]:
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps
                if "secret" in volume:
                    assert volume["secret"]["secretName"] == "cxr-cds-secrets"
                    keys = {item["key"] for item in volume["secret"]["items"]}
                    assert keys <= secret["stringData"].keys()
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in configmaps
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "cxr-cds-secrets"
                        assert ref["key"] in secret["stringData"]


def test_secret_example_is_marked_as_placeholders() -> None:
    secret = by_kind("Secret")["cxr-cds-secrets"]
    assert all("REPLACE-ME" in value for value in secret["stringData"].values())
    assert "EXAMPLE ONLY" in (K8S / "secret.example.yaml").read_text(encoding="utf-8")


def test_network_policies_web_from_ingress_worker_no_ingress() -> None:
    policies = by_kind("NetworkPolicy")
    web_labels = by_kind("Deployment")["cxr-cds-web"]["spec"]["template"]["metadata"]["labels"]
    worker_labels = by_kind("Deployment")["cxr-cds-worker"]["spec"]["template"]["metadata"][
        "labels"
    ]
    web, worker = policies["cxr-cds-web"], policies["cxr-cds-worker"]
    assert web["spec"]["podSelector"]["matchLabels"].items() <= web_labels.items()
    assert worker["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items()
    for policy in (web, worker):
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert ports == {53, 5432, 6379, 443}  # DNS, PostgreSQL, Redis, EHR / PACS only
    assert worker["spec"]["ingress"] == []  # nothing may connect to a worker
    sources = [s for rule in web["spec"]["ingress"] for s in rule["from"]]
    namespaces = {
        s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources
    }
    assert "ingress-nginx" in namespaces
    assert {p["port"] for rule in web["spec"]["ingress"] for p in rule["ports"]} == {8080}


# KEDA's ScaledObject is a CRD: no schema in kubernetes-validate. Its fields used here, as in
# KEDA's keda.sh/v1alpha1 API (trigger metadata is a map of strings).
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
            },
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"behavior": {"type": "object"}},
                        }
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["prometheus", "redis"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                        "allOf": [
                            {
                                "if": {"properties": {"type": {"const": "prometheus"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {
                                            "required": ["serverAddress", "query", "threshold"]
                                        }
                                    }
                                },
                            },
                            {
                                "if": {"properties": {"type": {"const": "redis"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {
                                            "required": ["address", "listName", "listLength"]
                                        }
                                    }
                                },
                            },
                        ],
                    },
                },
            },
        },
    },
}


def scaled_object_problems(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA)
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    if problems:
        return problems
    spec = doc["spec"]
    if spec["scaleTargetRef"]["name"] not in by_kind("Deployment"):
        problems.append(f"scaleTargetRef {spec['scaleTargetRef']['name']} is no Deployment")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("minReplicaCount above maxReplicaCount")
    for trigger in spec["triggers"]:
        if trigger["type"] == "prometheus":
            query, threshold = trigger["metadata"]["query"], trigger["metadata"]["threshold"]
            if "cxr_cds_jobs" not in query:
                problems.append(f"query {query!r} does not read cxr_cds_jobs")
            states = set(re.findall(r"[a-z]+", "".join(re.findall(r'state=~?"([^"]+)"', query))))
            if not states or not states <= set(JOB_STATES):
                problems.append(f"query states {states} are not job states {JOB_STATES}")
            if not re.fullmatch(r"\d+(\.\d+)?", threshold):
                problems.append(f"threshold {threshold!r} is not a number")
        if trigger["type"] == "redis":
            problems += redis_trigger_problems(trigger["metadata"])
    return problems


def redis_trigger_problems(metadata: dict[str, str]) -> list[str]:
    """The list is the Celery queue the workers consume, on the Redis of CXR_CDS_REDIS_URL."""
    from cds_service.jobs.celery_queue import QUEUE

    problems = []
    if metadata["listName"] != QUEUE:
        problems.append(f"listName {metadata['listName']!r} is not the queue {QUEUE!r}")
    if not metadata["listLength"].isdigit():
        problems.append(f"listLength {metadata['listLength']!r} is not a number")
    redis = urlsplit(configmap_env()["CXR_CDS_REDIS_URL"])
    host, _, port = metadata["address"].partition(":")
    if host.split(".")[0] != redis.hostname or int(port or 6379) != (redis.port or 6379):
        problems.append(f"address {metadata['address']} is not {redis.netloc}")
    if metadata.get("databaseIndex", "0") != (redis.path.strip("/") or "0"):
        problems.append("databaseIndex is not CXR_CDS_REDIS_URL's database")
    return problems


def test_worker_scaled_object_scales_the_worker_on_queue_depth() -> None:
    (scaled,) = by_kind("ScaledObject").values()
    assert scaled_object_problems(scaled) == []
    assert scaled["spec"]["scaleTargetRef"]["name"] == "cxr-cds-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1  # /readyz needs a worker
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"prometheus", "redis"}
    metrics = (ROOT / "cds_service/observability/metrics.py").read_text(encoding="utf-8")
    assert '"cxr_cds_jobs"' in metrics


@pytest.mark.parametrize(
    "break_it",
    [
        lambda s: s["spec"].pop("scaleTargetRef"),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=32),  # not a string
        lambda s: s["spec"].update(maxReplicas=8),  # HPA's name, not KEDA's
        lambda s: s["spec"]["triggers"][0]["metadata"].update(query="cxr_cds_job{state='x'}"),
        lambda s: s["spec"]["scaleTargetRef"].update(name="cxr-cds-wroker"),
        lambda s: s["spec"]["triggers"][1]["metadata"].update(listName="celery"),
        lambda s: s["spec"]["triggers"][1]["metadata"].pop("address"),
        lambda s: s["spec"]["triggers"][1]["metadata"].update(address="redis-master:6379"),
    ],
    ids=[
        "no-target",
        "int-threshold",
        "unknown-field",
        "wrong-metric",
        "no-such-deployment",
        "wrong-redis-list",
        "redis-without-address",
        "another-redis",
    ],
)
def test_a_broken_scaled_object_is_refused(break_it: Any) -> None:
    scaled = copy.deepcopy(next(iter(by_kind("ScaledObject").values())))
    break_it(scaled)
    assert scaled_object_problems(scaled)


def configmap_env() -> dict[str, str]:
    return dict(by_kind("ConfigMap")["cxr-cds-env"]["data"])


def test_kubernetes_settings_are_read_by_the_code() -> None:
    names = set(configmap_env())
    for kind in ("Deployment", "Job"):
        for name in by_kind(kind):
            for container in pod_spec(name, kind)["containers"]:
                names.update(v["name"] for v in container.get("env", []))
    assert not unknown_settings(names), f"not read by cds_service: {unknown_settings(names)}"


def test_a_misspelt_setting_is_refused() -> None:
    assert unknown_settings({"CXR_CDS_BAKEND", "CXR_CDS_MODEL_DIR", "HF_HUB_OFFLINE"}) == {
        "CXR_CDS_BAKEND"
    }


def test_kubernetes_example_configuration_loads_in_production_mode(
    generated_secrets: Path, tmp_path: Path
) -> None:
    """The ConfigMap's JSON files, at the paths the pods mount them, with the Secret's files
    where the pods mount them, pass the service's own production validation."""
    env = configmap_env()
    files = by_kind("ConfigMap")["cxr-cds-config"]["data"]
    web = pod_spec("cxr-cds-web")
    mounts = {m["name"]: m["mountPath"] for m in web["containers"][0]["volumeMounts"]}
    secret_items = {v["name"]: v for v in web["volumes"]}["secrets"]["secret"]["items"]
    secret_files = {f"{mounts['secrets']}/{item['path']}" for item in secret_items}
    placed: dict[str, Path] = {}
    for key in files:
        placed[f"{mounts['config']}/{key}"] = tmp_path / key
    for path in secret_files:
        placed[path] = tmp_path / Path(path).name
    (tmp_path / "backend.jwk.json").write_text(
        (generated_secrets / "backend.jwk.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (tmp_path / "notification-token").write_text("t" * 40, encoding="utf-8")
    (tmp_path / "database-url").write_text(
        (generated_secrets / "database-url.txt").read_text(encoding="utf-8"), encoding="utf-8"
    )
    for key, text in files.items():
        for mounted, local in placed.items():
            text = text.replace(f'"{mounted}"', json.dumps(str(local)))
        (tmp_path / key).write_text(text, encoding="utf-8")
    for name in ("CXR_CDS_TRUSTED_ISSUERS", "CXR_CDS_EHR_CLIENTS", "CXR_CDS_DATABASE_URL_FILE"):
        assert env[name] in placed, f"{name}={env[name]} is not a file the pods mount"
        env[name] = str(placed[env[name]])
    clients = load_ehr_clients(env["CXR_CDS_EHR_CLIENTS"])
    assert all(str(c.key_file) in {str(p) for p in placed.values()} for c in clients)
    settings = Settings.from_env(env)
    assert settings.mode == "production"
    assert settings.fhir_bases_without_access() == []  # every trusted EHR is registered
    assert all(c.notification_token for c in settings.ehr_clients)
    assert settings.queue == "celery" and settings.database_url
    assert urlsplit(settings.database_url).scheme == "postgresql"


def test_kubernetes_commands_are_real_cli_commands() -> None:
    for kind in ("Deployment", "Job"):
        for name in by_kind(kind):
            for container in pod_spec(name, kind)["containers"]:
                argvs = list(cxr_cds_argvs(container["args"]))
                assert argvs, f"{name}: no cxr-cds command in {container['args']}"
                for argv in argvs:
                    assert cli_problem(argv) is None, cli_problem(argv)
    web_args = pod_spec("cxr-cds-web")["containers"][0]["args"]
    assert web_args[:3] == ["cxr-cds", "serve", "--no-worker"]
    assert pod_spec("cxr-cds-worker")["containers"][0]["args"] == ["cxr-cds", "worker"]


def test_a_wrong_command_line_is_refused() -> None:
    assert cli_problem(["serve", "--no-wroker"])  # misspelt option
    assert cli_problem(["serv"])  # no such command
    assert cli_problem(["sandbox", "--port", "eighty"])  # not a number
    assert list(cxr_cds_argvs(["sh", "-c", "mkdir x && exec cxr-cds worker"])) == [["worker"]]


# -- compose -------------------------------------------------------------------------------
COMPOSE_TOP_LEVEL = {"version", "name", "services", "networks", "volumes", "secrets", "configs"}
ONE_SHOT_PROFILES = {"setup"}  # services run by hand with `docker compose run`, no healthcheck
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = documents(COMPOSE)[0]
    return data


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): expand_defaults(str(v)) for k, v in environment.items()}


def compose_problems(data: dict[str, Any]) -> list[str]:
    """The Compose specification's rules these files rely on, as a list of what is wrong."""
    problems: list[str] = []
    extra = {k for k in data if not k.startswith("x-")} - COMPOSE_TOP_LEVEL
    if extra:
        problems.append(f"unknown top-level keys {extra}")
    services: dict[str, Any] = data.get("services", {})
    built = {s["image"] for s in services.values() if "build" in s and "image" in s}
    for name, service in services.items():
        where = f"service {name}"
        if "image" not in service and "build" not in service:
            problems.append(f"{where}: neither image nor build")
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            if not (context / service["build"]["dockerfile"]).is_file():
                problems.append(f"{where}: no {service['build']['dockerfile']} in {context}")
        elif ":local" in service.get("image", "") and service["image"] not in built:
            problems.append(f"{where}: image {service['image']} is built by no service")
        one_shot = set(service.get("profiles", [])) & ONE_SHOT_PROFILES
        health = service.get("healthcheck")
        if not one_shot:
            if (
                not health
                or not health.get("test")
                or health["test"][0] not in ("CMD", "CMD-SHELL")
            ):
                problems.append(f"{where}: no healthcheck")
            for key in ("interval", "timeout", "start_period"):
                if health and key in health and not DURATION.match(str(health[key])):
                    problems.append(f"{where}: healthcheck {key} {health[key]!r} is no duration")
        depends = service.get("depends_on", {})
        for target, condition in depends.items() if isinstance(depends, dict) else []:
            if target not in services:
                problems.append(f"{where}: depends on unknown service {target}")
            elif condition.get("condition") == "service_healthy" and not services[target].get(
                "healthcheck"
            ):
                problems.append(f"{where}: waits for {target} to be healthy; it has no healthcheck")
        for kind in ("secrets", "configs"):
            for item in service.get(kind, []):
                source = item if isinstance(item, str) else item["source"]
                if source not in data.get(kind, {}):
                    problems.append(f"{where}: {kind[:-1]} {source} is not defined")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            named = not source.startswith((".", "/", "$", "~"))
            if named and source not in (data.get("volumes") or {}):
                problems.append(f"{where}: volume {source} is not defined")
        for port in service.get("ports", []):
            if not re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+:\d+(/(tcp|udp))?", str(port)):
                problems.append(f"{where}: port {port!r}")
        unknown = unknown_settings(set(service_environment(service)))
        if unknown:
            problems.append(f"{where}: settings the code never reads: {sorted(unknown)}")
    interpolated = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", json.dumps(data)))
    if unknown_settings(interpolated):
        problems.append(
            f"interpolated settings the code never reads: {unknown_settings(interpolated)}"
        )
    worker = services.get("worker", {})
    devices = (
        worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    if not any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or len(d.get("device_ids", [])) == 1)
        for d in devices
    ):
        problems.append("worker: no reservation of one nvidia GPU")
    for kind in ("secrets", "configs"):
        for name, spec in (data.get(kind) or {}).items():
            if not str(spec.get("file", "")).startswith("./secrets/"):
                problems.append(f"{kind[:-1]} {name}: not a file under deploy/secrets")
    return problems


def test_compose_file_follows_the_rules() -> None:
    assert compose_problems(compose()) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["secrets"].pop("db_password"),
        lambda c: c["services"]["worker"].pop("deploy"),
        lambda c: c["services"]["web"]["environment"].update(CXR_CDS_EHR_CLIENT="/x.json"),
        lambda c: c["services"]["redis"].pop("healthcheck"),
        lambda c: c["services"]["web"].update(volumes=["cxr-data:/var/lib/cxr-cds"]),
        lambda c: c["services"]["web"]["healthcheck"].update(interval="30 seconds"),
        lambda c: c["services"]["web"].update(build={"context": "..", "dockerfile": "deploy/nope"}),
        lambda c: c.update(service={}),
    ],
    ids=[
        "undefined-secret",
        "no-gpu",
        "misspelt-setting",
        "no-healthcheck",
        "undefined-volume",
        "bad-duration",
        "missing-containerfile",
        "unknown-top-level-key",
    ],
)
def test_a_broken_compose_file_is_refused(break_it: Any) -> None:
    data = copy.deepcopy(compose())
    break_it(data)
    assert compose_problems(data)


def test_compose_commands_are_real_cli_commands() -> None:
    seen = set()
    for name, service in compose()["services"].items():
        if "command" not in service:
            continue
        for argv in cxr_cds_argvs(service["command"]):
            assert cli_problem(argv) is None, f"{name}: {cli_problem(argv)}"
            seen.add(argv[0])
    assert {"serve", "worker", "sandbox", "subscribe", "model"} <= seen


def test_compose_web_and_worker_share_the_model_and_mount_it_read_only() -> None:
    services = compose()["services"]
    web, worker = service_environment(services["web"]), service_environment(services["worker"])
    shared = ("CXR_CDS_BACKEND", "CXR_CDS_MODEL_DIR", "CXR_CDS_DATABASE_URL_FILE", "CXR_CDS_QUEUE")
    for key in shared:
        assert web[key] == worker[key], key
    for name in ("web", "worker"):
        mounts = [v for v in services[name]["volumes"] if f":{web['CXR_CDS_MODEL_DIR']}" in v]
        assert len(mounts) == 1 and mounts[0].endswith(":ro"), (name, mounts)
    assert web["CXR_CDS_MODEL_DEVICE"] == "cpu" and worker["CXR_CDS_MODEL_DEVICE"] == "cuda"


@pytest.fixture(scope="module")
def generated_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/make-secrets.sh, run into a temporary folder (never into deploy/secrets)."""
    folder = tmp_path_factory.mktemp("secrets")
    env = {**os.environ, "SECRETS_DIR": str(folder), "PYTHON": sys.executable}
    subprocess.run(
        ["sh", str(DEPLOY / "make-secrets.sh")], env=env, check=True, capture_output=True
    )
    return folder


def test_make_secrets_writes_every_file_compose_names(generated_secrets: Path) -> None:
    data = compose()
    for kind in ("secrets", "configs"):
        for spec in data[kind].values():
            assert (generated_secrets / Path(spec["file"]).name).is_file(), spec["file"]
    from cds_service.fhir.backend_services import load_signing_key
    from ehr_sandbox.cds_client import SigningKey

    private = load_signing_key(generated_secrets / "backend.jwk.json")
    public = SigningKey.load_or_create(generated_secrets / "backend.public.jwk.json")
    assert public.kid == private.kid and not public.key.is_private
    token = (generated_secrets / "notification-token.txt").read_text(encoding="utf-8")
    assert len(token.strip()) >= 32


def test_compose_example_configuration_works_against_the_sandbox(
    generated_secrets: Path, tmp_path: Path
) -> None:
    """config/*.json with the secrets where compose mounts them: the service's own loaders
    and validation accept them, every trusted EHR is registered, and every URL names a
    service (and port) of the same compose project."""
    data = compose()
    services = data["services"]
    env = service_environment(services["web"])
    mounts = dict(v.split(":")[:2] for v in services["web"]["volumes"])
    config_dir = {target: source for source, target in mounts.items()}["/etc/cxr-cds"]
    secret_paths = {
        f"/run/secrets/{name}": generated_secrets / Path(data["secrets"][name]["file"]).name
        for name in services["web"]["secrets"]
    }
    for name in ("CXR_CDS_TRUSTED_ISSUERS", "CXR_CDS_EHR_CLIENTS"):
        source = DEPLOY / config_dir / Path(env[name]).relative_to("/etc/cxr-cds")
        text = source.read_text(encoding="utf-8")
        for mounted, local in secret_paths.items():
            text = text.replace(f'"{mounted}"', json.dumps(str(local)))
        assert "/run/secrets/" not in text, f"{source.name} names a secret web does not mount"
        (tmp_path / source.name).write_text(text, encoding="utf-8")
        env[name] = str(tmp_path / source.name)
    for name, value in env.items():
        if value.startswith("/run/secrets/"):
            assert value in secret_paths, f"{name}={value}: a secret web does not mount"
            env[name] = str(secret_paths[value])
    settings = Settings.from_env(env)
    assert settings.queue == "celery" and settings.redis_url == "redis://redis:6379/0"
    database = urlsplit(settings.database_url or "")
    assert database.hostname in services and database.port == 5432
    assert database.username == service_environment(services["postgres"])["POSTGRES_USER"]
    password = (generated_secrets / "db-password.txt").read_text(encoding="utf-8").strip()
    assert database.password == password  # the password the postgres service is given
    assert settings.fhir_bases_without_access() == []
    assert all(c.notification_token for c in settings.ehr_clients)

    sandbox_argv = next(cxr_cds_argvs(services["ehr-sandbox"]["command"]))
    host = sandbox_argv[sandbox_argv.index("--host") + 1]
    port = sandbox_argv[sandbox_argv.index("--port") + 1]
    sandbox = f"http://{host}:{port}"  # what the sandbox calls itself (its base URL)
    assert host in services and services[host].get("hostname") == host
    issuers = load_trusted_issuers(env["CXR_CDS_TRUSTED_ISSUERS"])
    assert [i.iss for i in issuers] == [sandbox]  # the iss of the sandbox's CDS client JWTs
    assert issuers[0].jwks_url == f"{sandbox}/.well-known/jwks.json"
    (client,) = load_ehr_clients(env["CXR_CDS_EHR_CLIENTS"])
    assert client.fhir_base == f"{sandbox}/fhir"
    assert client.token_url == f"{sandbox}/auth/token"
    from ehr_sandbox.service_registration import SERVICE_CLIENT_ID

    assert client.client_id == SERVICE_CLIENT_ID
    assert client.image_servers == ("http://orthanc:8042/dicom-web/",)
    orthanc = json.loads((DEPLOY / "config/orthanc.json").read_text(encoding="utf-8"))
    assert orthanc["HttpPort"] == 8042 and orthanc["DicomWeb"]["Root"] == "/dicom-web/"
    assert settings.public_url == "http://web:8080"  # the notifications' and JWT aud's host
    assert any(p.endswith(":8080") for p in services["web"]["ports"])


# -- Containerfiles ------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return result


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for kw, rest in steps if kw == "ARG" and "=" in rest)


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("name", sorted(CONTAINERFILES))
def test_containerfile_is_sound(name: str) -> None:
    path = CONTAINERFILES[name]
    steps = instructions(path)
    args = arg_defaults(steps)
    keywords = [kw for kw, _ in steps]
    known = {"ARG", "FROM", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK"}
    assert set(keywords) <= known | {"ENTRYPOINT", "CMD"}, set(keywords) - known
    assert keywords.count("FROM") == 1
    for keyword, rest in steps:
        if keyword == "COPY":
            words = [w for w in substitute(rest, args).split() if not w.startswith("--")]
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file"
        if keyword in {"CMD", "ENTRYPOINT"}:
            json.loads(rest)  # exec form: signals reach the process
    user = [rest for kw, rest in steps if kw == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    env_names = set(
        re.findall(r"\b(CXR_CDS_[A-Z0-9_]+)=", " ".join(r for k, r in steps if k == "ENV"))
    )
    assert not unknown_settings(env_names), unknown_settings(env_names)


def containerfile_cmd(name: str) -> list[str]:
    steps = instructions(CONTAINERFILES[name])
    cmd: list[str] = json.loads([rest for kw, rest in steps if kw == "CMD"][-1])
    return cmd


def test_web_image_serves_without_worker_and_checks_healthz() -> None:
    steps = instructions(CONTAINERFILES["web"])
    args = arg_defaults(steps)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    cmd = containerfile_cmd("web")
    assert cmd[:3] == ["cxr-cds", "serve", "--no-worker"] and cli_problem(cmd[1:]) is None
    (health,) = [rest for kw, rest in steps if kw == "HEALTHCHECK"]
    assert "/healthz" in health
    text = " ".join(rest for kw, rest in steps if kw in {"RUN", "COPY"})
    assert "requirements-web.lock" in text and "--require-hashes" in text
    assert "[ml]" not in text and "torch" not in text


def test_worker_image_on_cuda_with_the_model_read_only() -> None:
    steps = instructions(CONTAINERFILES["worker"])
    args = arg_defaults(steps)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime-ubuntu" in args["CUDA_IMAGE"]
    assert (ROOT / args["TORCH_LOCK"]).is_file()
    cmd = containerfile_cmd("worker")
    assert cmd == ["cxr-cds", "worker"] and cli_problem(cmd[1:]) is None
    runs = " ".join(rest for kw, rest in steps if kw == "RUN")
    assert "python3.11 -m venv" in runs and "--require-hashes" in runs
    assert "requirements.lock" in runs and "requirements-torch.lock" in runs
    env = " ".join(rest for kw, rest in steps if kw == "ENV")
    assert "CXR_CDS_MODEL_DIR=/models/cxr-llava" in env and "CXR_CDS_MODEL_DEVICE=cuda" in env
    # The weights-hash cache lives in the weights folder (identity.HASH_CACHE), so the image
    # says how it is written before the folder is mounted read-only.
    from cds_service.inference.cxr_llava.identity import HASH_CACHE

    text = CONTAINERFILES["worker"].read_text(encoding="utf-8")
    assert HASH_CACHE in text and "cxr-cds model info /models/cxr-llava" in text


def test_containerfiles_of_compose_services_exist_and_match() -> None:
    services = compose()["services"]
    for name in ("web", "worker", "orthanc"):
        assert (ROOT / services[name]["build"]["dockerfile"]) == CONTAINERFILES[name]


# -- lock files ----------------------------------------------------------------------------
def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `pip install --require-hashes` requirements file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\;]+)", line)
        if match:
            current = canonicalize_name(match.group(1))
            assert current not in entries, f"{path.name}: {current} twice"
            entries[current] = (match.group(2), [])
        elif current and line.strip().startswith("--hash=sha256:"):
            entries[current][1].append(line.strip().removesuffix("\\").strip())
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"{path.name}: unexpected line {line!r}")
    return entries


@cache
def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return data


def requirements(*extras: str) -> list[Requirement]:
    data = project()["project"]
    found = [Requirement(r) for r in data["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in data["optional-dependencies"][extra]]
    return found


def test_lock_files_hash_every_package() -> None:
    for name in ("web", "worker", "torch-cu130"):
        path = DEPLOY / f"requirements-{name}.lock"
        entries = lock_entries(path)
        assert entries, path
        for package, (_version, hashes) in entries.items():
            assert hashes and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes), (
                f"{path.name}: {package} without a sha256"
            )
        assert "CPython 3.11 on Linux" in path.read_text(encoding="utf-8")


def test_lock_files_cover_pyproject_dependencies() -> None:
    web = lock_entries(DEPLOY / "requirements-web.lock")
    worker = lock_entries(DEPLOY / "requirements-worker.lock")
    torch = lock_entries(DEPLOY / "requirements-torch-cu130.lock")
    assert not set(worker) & set(torch), "a package in two locks the worker installs together"
    images = {"web": (web, ("scale",)), "worker": ({**worker, **torch}, ("ml", "scale"))}
    for image, (locked, extras) in images.items():
        for requirement in requirements(*extras):
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{image} lock lacks {name}: run deploy/lock.sh"
            assert requirement.specifier.contains(locked[name][0], prereleases=True), (
                f"{image} lock: {name}=={locked[name][0]} does not satisfy {requirement}"
            )
            for extra in requirement.extras:  # psycopg[binary], celery[redis]
                assert {"binary": "psycopg-binary", "redis": "redis"}[extra] in locked
    # Web and worker share the database and the Celery protocol: the same versions of both.
    for name in set(web) & set(worker):
        assert web[name][0] == worker[name][0], f"{name}: web {web[name][0]} != {worker[name][0]}"
    assert "torch" not in web and "transformers" not in web  # the web image holds no model


def test_torch_lock_is_the_pinned_cuda_build() -> None:
    torch = lock_entries(DEPLOY / "requirements-torch-cu130.lock")
    assert all(CUDA_PACKAGES.match(name) for name in torch), sorted(torch)
    (pin,) = [r for r in requirements("ml") if r.name == "torch"]
    assert str(pin.specifier) == "==2.13.0" and torch["torch"][0] == "2.13.0"
    assert any(name.startswith("nvidia-") for name in torch)  # PyPI's Linux wheel is CUDA's
    worker = lock_entries(DEPLOY / "requirements-worker.lock")
    assert not any(CUDA_PACKAGES.match(name) for name in worker)


def test_build_requirements_match_pyproject() -> None:
    wanted = [Requirement(r) for r in project()["build-system"]["requires"]]
    text = (DEPLOY / "build-requirements.in").read_text(encoding="utf-8")
    listed = [Requirement(line) for line in text.splitlines() if line and not line.startswith("#")]
    assert [str(r) for r in listed] == [str(r) for r in wanted]
    for lock in ("web", "worker"):
        entries = lock_entries(DEPLOY / f"requirements-{lock}.lock")
        for requirement in wanted:
            assert requirement.specifier.contains(entries[canonicalize_name(requirement.name)][0])
