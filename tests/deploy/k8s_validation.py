"""Offline checks for Kubernetes manifests: schemas, and the pod rules every nanochat pod follows.

Notable:
- Core objects are validated against the OpenAPI schemas that `kubernetes-validate` ships (no cluster
  needed), in strict mode: an unknown field is an error, as it is for `kubectl apply` (server-side
  strict field validation, the default since 1.27), instead of being dropped silently.
- KubeRay objects (RayCluster, RayJob, RayService) are validated against the openAPIV3Schema of the
  CRDs the repo ships in `k8s/crds/`, made strict the same way; the CEL rules
  (`x-kubernetes-validations`) are not evaluated (they guard fields we do not set: managedBy,
  deletionStrategy, immutability on update); `validate_kuberay_rules` adds what the operator itself
  rejects (names, replica bounds, RayJob clean-up and retry fields, the submitter Job's restartPolicy).
- `pod_templates` finds every pod template inside workloads and KubeRay objects, so a check written
  once (`assert_secure_pod`, resource requests) covers the chart and the speedrun job alike.
- `network_policies_admit` evaluates rendered NetworkPolicies as Kubernetes does (pod and namespace
  selectors, ports), so "does the operator reach the head's port 8000" is a question a test can ask.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "k8s" / "crds"
KUBERAY_CRDS: dict[str, Path] = {
    "RayCluster": CRD_DIR / "ray.io_rayclusters.yaml",
    "RayJob": CRD_DIR / "ray.io_rayjobs.yaml",
    "RayService": CRD_DIR / "ray.io_rayservices.yaml",
}
K8S_VERSION = "1.33"  # the schemas checked against: the kubectl release the project's tools install
# kinds whose pod template is spec.template (CronJob and the KubeRay kinds are handled in pod_templates)
_WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _describe(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def _error_text(err: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<root>"
    return f"{path}: {err.message}"


# ---------------------------------------------------------------------------------------------
# Schemas


def validate_k8s_object(obj: dict, version: str = K8S_VERSION) -> None:
    """Raise AssertionError unless `obj` (a core/apps/batch/... object) fits its Kubernetes schema."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise AssertionError(f"{_describe(obj)} (Kubernetes {err.version}): {_error_text(err)}") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise AssertionError(err.message) from None


def validate_pod_template(template: dict, version: str = K8S_VERSION, where: str = "pod template") -> None:
    """Validate a PodTemplateSpec (metadata + spec) by wrapping it in a core/v1 PodTemplate."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    try:
        kubernetes_validate.validate(wrapper, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise AssertionError(f"{where} (Kubernetes {err.version}): {_error_text(err)}") from None


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validators(crd_path: str) -> tuple[str, str, dict[str, jsonschema.protocols.Validator]]:
    """(group, kind, {version: validator}) of one CRD file; parsed once per process (the files are MBs)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(Path(crd_path).read_text(), Loader=loader)
    spec = crd["spec"]
    validators = {}
    for v in spec["versions"]:
        schema = _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
        validators[v["name"]] = jsonschema.Draft7Validator(schema)
    return spec["group"], spec["names"]["kind"], validators


def validate_crd_object(obj: dict, crd_path: str | Path) -> None:
    """Raise AssertionError unless `obj` is a served version of the CRD at `crd_path` and fits its schema.

    Every error is listed, not only the first, since a manifest usually has several at once.
    """
    group, kind, validators = _crd_validators(str(crd_path))
    api_group, _, api_version = obj.get("apiVersion", "").rpartition("/")
    if obj.get("kind") != kind or api_group != group:
        raise AssertionError(f"{_describe(obj)} is {obj.get('apiVersion')}, not a {group} {kind}")
    if api_version not in validators:
        raise AssertionError(f"{_describe(obj)}: {group} serves {sorted(validators)}, not {api_version}")
    name = obj.get("metadata", {}).get("name", "")
    if not name:
        raise AssertionError(f"{_describe(obj)}: metadata.name is required")
    errors = sorted(validators[api_version].iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        listing = "\n  ".join(_error_text(e) for e in errors)
        raise AssertionError(f"{_describe(obj)} does not fit {Path(crd_path).name}:\n  {listing}")


# KubeRay appends "-xxxxx" to RayJob/RayService names for their RayCluster, whose limit is 53 characters.
_MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _cluster_rules(spec: dict, where: str) -> list[str]:
    problems = []
    if not spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers"):
        problems.append(f"{where}.headGroupSpec: no container")
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{at}: no container")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            problems.append(f"{at}: replicas {replicas} outside minReplicas..maxReplicas {low}..{high}")
    return problems


def validate_kuberay_rules(obj: dict) -> None:
    """Raise AssertionError on what the KubeRay operator (or the Job it creates) rejects beyond the CRD schema
    (ray-operator/controllers/ray/utils/validation.go): names, replica bounds, RayJob retry and clean-up fields."""
    kind, spec, name = obj["kind"], obj.get("spec", {}), obj["metadata"]["name"]
    problems = []
    if len(name) > _MAX_NAME[kind] or not _DNS1035.match(name):
        problems.append(f"metadata.name {name!r}: needs a DNS-1035 label of at most {_MAX_NAME[kind]} characters")
    if kind == "RayCluster":
        problems += _cluster_rules(spec, "spec")
    elif kind == "RayService":
        problems += _cluster_rules(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")
        if spec.get("rayClusterConfig", {}).get("headGroupSpec", {}).get("headService", {}).get("metadata", {}).get("name"):
            problems.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
    elif kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if "rayClusterSpec" in spec:
            problems += _cluster_rules(spec["rayClusterSpec"], "spec.rayClusterSpec")
        elif not spec.get("clusterSelector"):
            problems.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if mode != "InteractiveMode" and not spec.get("entrypoint", "").strip():
            problems.append("spec.entrypoint is empty")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
            problems.append("spec.ttlSecondsAfterFinished and spec.backoffLimit must not be negative")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            problems.append("spec.activeDeadlineSeconds must be positive")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as e:
            problems.append(f"spec.runtimeEnvYAML is not YAML: {e}")
        submitter = spec.get("submitterPodTemplate")
        if submitter is not None:
            if mode == "SidecarMode":
                problems.append("spec.submitterPodTemplate is not supported in SidecarMode")
            # it becomes a batch/v1 Job's template, where only these two are allowed
            if submitter.get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
                problems.append("spec.submitterPodTemplate.spec.restartPolicy must be Never or OnFailure")
    if problems:
        raise AssertionError(f"{_describe(obj)} breaks KubeRay's rules:\n  " + "\n  ".join(problems))


def validate_object(obj: dict, version: str = K8S_VERSION) -> None:
    """Validate any object: KubeRay kinds against the shipped CRDs, the operator's own rules and (for their
    pod templates) the core schema, everything else against the Kubernetes schemas."""
    if obj.get("kind") in KUBERAY_CRDS and obj.get("apiVersion", "").startswith("ray.io/"):
        validate_crd_object(obj, KUBERAY_CRDS[obj["kind"]])
        validate_kuberay_rules(obj)
        for where, template in pod_templates(obj):
            validate_pod_template(template, version, where=f"{_describe(obj)} {where}")
    else:
        validate_k8s_object(obj, version)


# ---------------------------------------------------------------------------------------------
# Finding pods


def _ray_cluster_templates(cluster_spec: dict, prefix: str) -> Iterator[tuple[str, dict]]:
    yield f"{prefix}.headGroupSpec.template", cluster_spec["headGroupSpec"]["template"]
    for i, group in enumerate(cluster_spec.get("workerGroupSpecs", [])):
        yield f"{prefix}.workerGroupSpecs[{i}].template", group["template"]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """Yield (location, PodTemplateSpec) for every pod template inside `obj`; nothing for other kinds."""
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind in _WORKLOAD_KINDS:
        yield "spec.template", spec["template"]
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"]
    elif kind == "RayCluster":
        yield from _ray_cluster_templates(spec, "spec")
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:  # absent when the job targets an existing cluster (clusterSelector)
            yield from _ray_cluster_templates(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    elif kind == "RayService":
        yield from _ray_cluster_templates(spec["rayClusterConfig"], "spec.rayClusterConfig")


def pod_specs(obj: dict) -> Iterator[dict]:
    """Yield every PodSpec inside `obj`: a Pod's own spec, or the spec of each of its pod templates."""
    if obj.get("kind") == "Pod":
        yield obj["spec"]
        return
    for _, template in pod_templates(obj):
        yield template["spec"]


# ---------------------------------------------------------------------------------------------
# Pod rules


def _container_problems(c: dict, pod_sc: dict) -> list[str]:
    sc, name = c.get("securityContext", {}), c.get("name", "?")
    effective = {**pod_sc, **sc}  # a container's setting overrides the pod's
    caps = sc.get("capabilities", {})
    problems = []
    if effective.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if effective.get("runAsUser") == 0 or effective.get("runAsGroup") == 0:
        problems.append("runs as uid or gid 0 (root)")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append("privileged")
    if "ALL" not in caps.get("drop", []):
        problems.append("capabilities.drop lacks ALL")
    if caps.get("add"):
        problems.append(f"adds capabilities {caps['add']}")
    seccomp = effective.get("seccompProfile", {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"seccompProfile is {seccomp}, not RuntimeDefault")
    requests = c.get("resources", {}).get("requests", {})
    problems += [f"no {r} request" for r in ("cpu", "memory") if r not in requests]
    return [f"{name}: {p}" for p in problems]


def assert_secure_pod(spec: dict) -> None:
    """Raise AssertionError unless every container of the PodSpec runs hardened and with requests:

    non-root (runAsNonRoot, and no runAsUser/runAsGroup 0), read-only root filesystem, no privilege
    escalation, every capability dropped, RuntimeDefault (or Localhost) seccomp, CPU and memory requests;
    and the pod shares no host namespace.
    """
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    problems = [p for c in containers for p in _container_problems(c, spec.get("securityContext", {}))]
    if not containers:
        problems.append("no containers")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append("shares a host namespace")
    if problems:
        raise AssertionError("insecure pod:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# NetworkPolicy


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Peer:
    """A pod sending traffic: its labels, its namespace and that namespace's labels."""

    labels: dict[str, str]
    namespace: str
    namespace_labels: dict[str, str]


def _peer_matches(peer_rule: dict, source: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in peer_rule:
        return False  # pod-to-pod traffic is judged by selectors here
    if "namespaceSelector" in peer_rule:
        if not _selects(peer_rule["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False  # a podSelector alone means the policy's own namespace
    return _selects(peer_rule.get("podSelector"), source.labels)


def network_policies_admit(policies: list[dict], pod_labels: dict[str, str], namespace: str, port: int,
                           source: Peer) -> bool:
    """Whether Kubernetes lets `source` open TCP `port` on a pod with `pod_labels` in `namespace`, under these
    NetworkPolicy objects (ingress only; numeric ports): a pod no policy selects accepts everything, a
    selected pod accepts what any rule of any selecting policy allows."""
    selecting = [p for p in policies if p["metadata"].get("namespace", namespace) == namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_matches(peer, source, namespace) for peer in peers):
                return True
    return False
