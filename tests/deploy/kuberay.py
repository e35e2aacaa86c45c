"""
What the KubeRay operator and the kubelet make of a rendered pod template, replayed as Docker containers.

There is no Kubernetes API server in the test environment, so the cluster-replay tests take the chart's and
the RayJob's rendered objects and run each Ray pod the way KubeRay would build it, as a container on one
Docker network:
- the command: KubeRay replaces the Ray container's command with `/bin/bash -lc --` and a generated
  `ulimit -n ...; ray start ...` built from rayStartParams (flags sorted, boolean "true" as a bare flag, the
  missing defaults added: dashboard-host on the head, address on workers, metrics-export-port, block,
  dashboard-agent-listen-port; num-cpus, memory and num-gpus from the container's limits)
- the environment: the template's own (values, secretKeyRef from the given Secrets, fieldRef) plus what
  KubeRay injects (RAY_ADDRESS, FQ_RAY_IP on workers, RAY_CLUSTER_NAME, KUBERAY_GEN_RAY_START_CMD, the
  RayService timeouts, RAY_AUTH_MODE and RAY_AUTH_TOKEN with authOptions mode token)
- the pod: uid/gid and fsGroup, read-only root filesystem, dropped capabilities and no privilege escalation
  as its securityContext says; every emptyDir a tmpfs owned by the pod's user (the only writable paths),
  a Memory emptyDir at /dev/shm the container's shm size; CPU and memory limits (CPUs capped at this machine's)
- the head is reachable as its Service (`<cluster>-head-svc` and the FQDN workers are given) by network alias
- probes: run inside the container with `docker exec`, as the kubelet runs exec probes; an httpGet probe
  becomes a wget of the same port and path
Only what the replay needs is modelled; the names of the KubeRay constants are given where they are used.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "default"
DASHBOARD_PORT, AGENT_PORT, GCS_PORT, SERVE_PORT, METRICS_PORT = 8265, 52365, 6379, 8000, 8080
UNIFIED_HEALTH_PATH = "api/healthz"  # Ray >= 2.53: one HTTP probe on the dashboard agent
WGET_PROBE = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "4Gi", 2) as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match[1]) * _UNITS.get(match[2], 1)


def head_service(cluster: str) -> str:
    return f"{cluster}-head-svc"


def head_fqdn(cluster: str) -> str:
    return f"{head_service(cluster)}.{NAMESPACE}.svc.cluster.local"


@dataclass
class Pod:
    """One Ray pod as a container: everything `docker run` needs."""

    name: str
    image: str
    user: str
    group_add: list[str]
    read_only: bool
    cap_drop_all: bool
    no_new_privileges: bool
    env: dict[str, str]
    command: list[str]
    args: list[str]
    tmpfs: list[str]
    shm_size: int | None
    cpus: float | None
    memory: int | None
    aliases: list[str] = field(default_factory=list)
    readiness: list[str] = field(default_factory=list)  # shell commands, all must succeed

    def run_args(self, network: str, publish: dict[int, int] | None = None) -> list[str]:
        args = ["run", "-d", "--name", self.name, "--hostname", self.name[:63], "--network", network,
                "--user", self.user, "--init=false"]
        args += [a for alias in self.aliases for a in ("--network-alias", alias)]
        args += [a for group in self.group_add for a in ("--group-add", group)]
        if self.read_only:
            args.append("--read-only")
        if self.cap_drop_all:
            args += ["--cap-drop", "ALL"]
        if self.no_new_privileges:
            args += ["--security-opt", "no-new-privileges"]
        args += [a for mount in self.tmpfs for a in ("--tmpfs", mount)]
        if self.shm_size:
            args += ["--shm-size", str(self.shm_size)]
        if self.cpus:
            args += ["--cpus", f"{self.cpus:g}"]
        if self.memory:
            args += ["--memory", str(self.memory)]
        args += [a for name, value in self.env.items() for a in ("--env", f"{name}={value}")]
        args += [a for host, inside in (publish or {}).items() for a in ("--publish", f"127.0.0.1:{host}:{inside}")]
        return args + ["--entrypoint", self.command[0], self.image, *self.command[1:], *self.args]


# ---------------------------------------------------------------------------------------------
# the ray start command (KubeRay: setMissingRayStartParams, generateRayStartCommand, convertParamMap)


def ray_start_params(params: dict[str, Any], node_type: str, cluster: str, limits: dict[str, Any]) -> dict[str, str]:
    out = {k: str(v) for k, v in (params or {}).items()}
    if node_type == "worker":
        out.setdefault("address", f"{head_fqdn(cluster)}:{GCS_PORT}")
    else:
        out.setdefault("dashboard-host", "0.0.0.0")
    out.setdefault("metrics-export-port", str(METRICS_PORT))
    out["block"] = "true"
    out.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    if "num-cpus" not in out and "cpu" in limits:
        out["num-cpus"] = str(math.ceil(quantity(limits["cpu"])))
    if "memory" not in out and "memory" in limits:
        out["memory"] = str(int(quantity(limits["memory"])))
    if "num-gpus" not in out and limits.get("nvidia.com/gpu"):
        out["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    return out


def ray_start_command(params: dict[str, str], node_type: str) -> str:
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard", "include-log-monitor"):
            if value.lower() == "true":
                flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={value}")
    return " ".join(["ray", "start", *(["--head"] if node_type == "head" else []), *flags])


# ---------------------------------------------------------------------------------------------
# a pod from a head or worker group spec


def _env(container: dict[str, Any], secrets: dict[str, dict[str, str]], labels: dict[str, str], pod_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise KeyError(f"env {item['name']}: Secret {ref['name']!r} has no key {ref['key']!r}")
            env[item["name"]] = value
        elif "fieldRef" in source:
            env[item["name"]] = _field(source["fieldRef"]["fieldPath"], labels, pod_name)
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            env.update(secrets.get(source["secretRef"]["name"], {}))
    return env


def _field(path: str, labels: dict[str, str], pod_name: str) -> str:
    if path == "metadata.namespace":
        return NAMESPACE
    if path == "metadata.name":
        return pod_name
    match = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
    if match:
        return labels.get(match[1], "")
    raise ValueError(f"fieldRef {path} is not modelled")


def _tmpfs(spec: dict[str, Any], container: dict[str, Any], uid: int | None,
           fs_group: int | None) -> tuple[list[str], int | None]:
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts, shm = [], None
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "emptyDir" not in volume:
            raise ValueError(f"volume {mount['name']}: only emptyDir volumes are replayed")
        empty_dir = volume["emptyDir"] or {}
        if mount["mountPath"] == "/dev/shm":
            shm = int(quantity(empty_dir.get("sizeLimit", "64Mi")))
            continue
        # an emptyDir is writable by every uid (mode 0777) and group-owned by fsGroup; Docker gives a tmpfs
        # over an image folder that folder's mode, so it is owned by the pod's user instead
        owner = "".join(f",{key}={value}" for key, value in (("uid", uid), ("gid", fs_group)) if value is not None)
        mounts.append(f"{mount['mountPath']}:rw,exec{owner}")
    return mounts, shm


def build_pod(cluster: str, group: dict[str, Any], node_type: str, *, image: str | None = None,
              secrets: dict[str, dict[str, str]] | None = None, auth_token: str | None = None,
              rayservice: bool = False, name: str | None = None, max_cpus: float | None = None) -> Pod:
    """The container KubeRay would run for the Ray container of a head or worker group."""
    template = group["template"]
    spec = template["spec"]
    container = spec["containers"][0]
    group_name = "headgroup" if node_type == "head" else group["groupName"]
    pod_name = name or f"{cluster}-{'head' if node_type == 'head' else group_name + '-worker'}"
    labels = {**(template.get("metadata", {}).get("labels") or {}), "ray.io/cluster": cluster,
              "ray.io/node-type": node_type, "ray.io/group": group_name}
    limits = (container.get("resources") or {}).get("limits") or {}
    params = ray_start_params(group.get("rayStartParams"), node_type, cluster, limits)
    start = ray_start_command(params, node_type)
    env = _env(container, secrets or {}, labels, pod_name)
    if node_type == "worker":
        env.setdefault("FQ_RAY_IP", head_fqdn(cluster))
        env.setdefault("RAY_IP", head_service(cluster))
    env.update(RAY_CLUSTER_NAME=cluster, RAY_CLUSTER_NAMESPACE=NAMESPACE, RAY_CLOUD_INSTANCE_ID=pod_name,
               RAY_NODE_TYPE_NAME=group_name, KUBERAY_GEN_RAY_START_CMD=start)
    env.setdefault("RAY_PORT", str(GCS_PORT))
    if rayservice:
        env.setdefault("RAY_TIMEOUT_MS_TASK_WAIT_FOR_DEATH_INFO", "0")
        env.setdefault("RAY_GCS_SERVER_REQUEST_TIMEOUT_SECONDS", "5")
        env.setdefault("RAY_SERVE_KV_TIMEOUT_S", "5")
    env.setdefault("RAY_ADDRESS", f"{'127.0.0.1' if node_type == 'head' else head_fqdn(cluster)}:{GCS_PORT}")
    env.setdefault("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a test
    if auth_token:
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_AUTH_TOKEN", auth_token)
    own_cmd = " ".join(container.get("command") or []) + " ".join(container.get("args") or [])
    args = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"
    if own_cmd.strip() and "ray start" not in own_cmd:
        args = f"{own_cmd} && {args}"
    pod_security = spec.get("securityContext") or {}
    security = container.get("securityContext") or {}
    uid = security.get("runAsUser", pod_security.get("runAsUser"))
    gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
    fs_group = pod_security.get("fsGroup")
    tmpfs, shm = _tmpfs(spec, container, uid, fs_group)
    cpus = quantity(limits["cpu"]) if "cpu" in limits else None
    if cpus and max_cpus:
        cpus = min(cpus, max_cpus)
    readiness = [f"wget --tries 1 -T 2 -q -O- http://localhost:{params['dashboard-agent-listen-port']}/{UNIFIED_HEALTH_PATH}"]
    if rayservice and node_type == "worker":  # KubeRay: a serving worker is ready once its proxy is
        readiness = [WGET_PROBE.format(timeout=2, port=params["dashboard-agent-listen-port"], path="api/local_raylet_healthz"),
                     WGET_PROBE.format(timeout=1, port=SERVE_PORT, path="-/healthz")]
    return Pod(
        name=pod_name, image=image or container["image"],
        user=f"{uid if uid is not None else ''}{':' + str(gid) if gid is not None else ''}" or "0",
        group_add=[str(fs_group)] if fs_group is not None else [],
        read_only=bool(security.get("readOnlyRootFilesystem")),
        cap_drop_all="ALL" in ((security.get("capabilities") or {}).get("drop") or []),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        env=env, command=["/bin/bash", "-lc", "--"], args=[args], tmpfs=tmpfs, shm_size=shm,
        cpus=cpus, memory=int(quantity(limits["memory"])) if "memory" in limits else None,
        aliases=[head_service(cluster), head_fqdn(cluster)] if node_type == "head" else [],
        readiness=readiness,
    )


# ---------------------------------------------------------------------------------------------
# running pods


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """A docker command through the client the container tests use (tests/deploy/containers.py picks it)."""
    from tests.deploy.containers import docker_client

    out = subprocess.run([docker_client(), *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {shlex.join(args[:4])} ... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def is_ready(pod: Pod) -> bool:
    """The pod's readiness probe, run in its container as the kubelet would."""
    probe = " && ".join(pod.readiness)
    out = docker("exec", pod.name, "bash", "-c", probe, check=False, timeout=30)
    return out.returncode == 0


def logs(name: str, tail: int = 80) -> str:
    out = docker("logs", "--tail", str(tail), name, check=False)
    return out.stdout + out.stderr

