"""
TPU: configs/d20-tpu.yaml and k8s/tpu-base-job.yaml, checked offline (no TPU and no cluster are reachable here).

Notable:
- the RayJob passes what k8s/speedrun-job.yaml passes: the KubeRay CRD (strict), the operator's rules, Kubernetes'
  pod schema, and the same hardened pods (its security contexts are the speedrun job's, field for field).
- the entrypoint is three `nanochat` commands joined by `&&`, each parsed by the real parser, with one preset,
  storage and run; the preset trains base on JAX on TPUs.
- one slice, three descriptions that must agree: the preset's Ray names (jax.tpu_accelerator, tpu_topology,
  train.workers), Ray's own tables (ray.util.tpu: workers and TPU chips per worker of that slice), and the
  worker group's GKE node selectors, numOfHosts and google.com/tpu. The preset's ScalingConfig is built by the
  runner itself, so Ray's validation of the strings runs too.
- the batch arithmetic of the preset (and of the 4x4 adaptation the manifest documents) comes out whole.
"""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser, config_from_args, overrides
from nanochat.config import Config, load_config
from tests.deploy.k8s_validation import assert_secure_pod, pod_specs, pod_templates, validate_object
from trainer.jaxgpt.train import expected_devices, micro_steps

REPO = Path(__file__).resolve().parents[2]
JOB_PATH = REPO / "k8s" / "tpu-base-job.yaml"
SPEEDRUN_PATH = REPO / "k8s" / "speedrun-job.yaml"
PRESET = "d20-tpu"
# Ray's accelerator type (what jax.tpu_accelerator holds) -> GKE's cloud.google.com/gke-tpu-accelerator label
GKE_ACCELERATOR = {
    "TPU-V4": "tpu-v4-podslice",
    "TPU-V5LITEPOD": "tpu-v5-lite-podslice",
    "TPU-V5P": "tpu-v5p-slice",
    "TPU-V6E": "tpu-v6e-slice",
}


def _load(path: Path) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return doc


@pytest.fixture(scope="module")
def job() -> dict:
    return _load(JOB_PATH)


@pytest.fixture(scope="module")
def commands(job: dict) -> list:
    """The entrypoint's commands, each parsed by the real `nanochat` parser."""
    parsed = []
    for command in job["spec"]["entrypoint"].split("&&"):
        argv = shlex.split(command)
        assert argv[0] == "nanochat", command
        parsed.append(build_parser().parse_args(argv[1:]))
    return parsed


@pytest.fixture(scope="module")
def cfg(commands: list) -> Config:
    return config_from_args(commands[-1])  # the training command's config, with every override it adds


def _tpu_group(job: dict) -> dict:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def _chips(topology: str) -> int:
    chips = 1
    for dim in topology.split("x"):
        chips *= int(dim)
    return chips


# ---------------------------------------------------------------------------------------------
# The preset


def test_preset_trains_d20_on_jax_on_tpus() -> None:
    cfg, d20 = load_config(preset=PRESET), load_config(preset="d20")
    assert (cfg.train.backend, cfg.jax.platform, cfg.jax.dtype) == ("jax", "tpu", "bfloat16")
    assert cfg.train.gpus_per_worker == 0
    # d20's model but full attention everywhere: XLA would compute every score a sliding window hides
    assert (cfg.model.window_pattern, d20.model.window_pattern) == ("L", "SSSL")
    assert cfg.model == d20.model.model_copy(update={"window_pattern": "L"})
    assert cfg.data == d20.data and cfg.tokenizer == d20.tokenizer
    # d20's 2**20 tokens per step come with recipe record, which the JAX backend does not train
    assert (cfg.train.recipe, d20.train.recipe) == ("classic", "record")
    assert cfg.train.total_batch_size == 524288
    assert cfg.train.seq_len == d20.train.seq_len


def test_preset_batch_arithmetic_is_whole_for_its_slice() -> None:
    cfg = load_config(preset=PRESET)
    devices = _chips(cfg.jax.tpu_topology)
    assert expected_devices(cfg) == devices
    steps = micro_steps(cfg, devices)
    assert steps * cfg.train.device_batch_size * cfg.train.seq_len * devices == cfg.train.total_batch_size
    assert steps == 32  # 1 row x 2048 tokens x 8 chips per micro-step
    assert devices % cfg.jax.fsdp == 0  # make_mesh needs fsdp to divide the devices


def test_ray_reads_the_presets_slice_as_train_workers_hosts() -> None:
    from ray.util.tpu import get_tpu_worker_resources

    cfg = load_config(preset=PRESET)
    workers, per_worker = get_tpu_worker_resources(cfg.jax.tpu_topology, cfg.jax.tpu_accelerator)
    assert workers == cfg.train.workers
    assert workers * per_worker["TPU"] == _chips(cfg.jax.tpu_topology)


def test_runner_builds_a_tpu_jax_trainer_that_ray_accepts(tmp_path: Path) -> None:
    import ray.train

    from trainer.pipeline.jobs import _trainer

    cfg = load_config(preset=PRESET)
    trainer = _trainer(lambda config: None, {}, cfg, "jax", ray.train.RunConfig(name="t", storage_path=str(tmp_path)))
    scaling = trainer.scaling_config
    assert type(trainer).__name__ == "JaxTrainer"
    assert (scaling.use_tpu, scaling.num_workers) == (True, cfg.train.workers)
    assert (scaling.topology, scaling.accelerator_type) == (cfg.jax.tpu_topology, cfg.jax.tpu_accelerator)
    assert scaling.resources_per_worker == {"CPU": 1, "TPU": _chips(cfg.jax.tpu_topology) // cfg.train.workers}


def test_ray_rejects_the_accelerator_spelling_gcp_uses(tmp_path: Path) -> None:
    # Ray knows v5e as v5litepod (ray/_private/accelerators/tpu.py); "TPU-V5E" fails at ScalingConfig time
    import ray.train

    from trainer.pipeline.jobs import _trainer

    cfg = load_config(preset=PRESET, overrides=["jax.tpu_accelerator=TPU-V5E", "jax.tpu_topology=4x4",
                                                "train.workers=4"])
    with pytest.raises(ValueError, match="TPU-V5E"):
        _trainer(lambda config: None, {}, cfg, "jax", ray.train.RunConfig(name="t", storage_path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# The RayJob: schemas and pod policy, as for the speedrun job


def test_tpu_job_fits_the_crd_the_operators_rules_and_the_pod_schema(job: dict) -> None:
    validate_object(job)  # RayJob CRD (strict), KubeRay's rules, every pod template against Kubernetes' schema
    assert len(list(pod_templates(job))) == 2  # head, TPU workers: submitted over HTTP, no submitter pod
    assert job["spec"]["submissionMode"] == "HTTPMode" and job["spec"]["activeDeadlineSeconds"] > 0


def test_tpu_job_pods_are_hardened_as_the_speedrun_jobs(job: dict) -> None:
    speedrun = _load(SPEEDRUN_PATH)
    (reference,) = {repr(s["securityContext"]) for s in pod_specs(speedrun)}
    (container_reference,) = {repr(c["securityContext"]) for s in pod_specs(speedrun) for c in s["containers"]}
    for spec in pod_specs(job):
        assert_secure_pod(spec)
        assert spec["automountServiceAccountToken"] is False
        assert repr(spec["securityContext"]) == reference
        for container in spec["containers"]:
            assert repr(container["securityContext"]) == container_reference


def test_writable_paths_are_volumes_and_shared_memory_is_memory(job: dict) -> None:
    for where, template in pod_templates(job):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for path in ("/data", "/tmp"):
            assert "emptyDir" in volumes[mounts[path]], f"{where}: {path}"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where


def test_s3_credentials_come_only_from_the_secret(job: dict) -> None:
    for where, template in pod_templates(job):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("nanochat-s3", name), f"{where}: {name}"
        assert not any("value" in e for e in env.values()), where


def test_job_cleans_up_retries_and_matches_the_pinned_ray(job: dict) -> None:
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] >= 1
    pinned = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert spec["rayClusterSpec"]["rayVersion"] == pinned


# ---------------------------------------------------------------------------------------------
# What the job runs, and on what


def test_entrypoint_prepares_data_and_tokenizer_then_trains_base_with_one_preset(commands: list,
                                                                                 cfg: Config) -> None:
    assert [(a.command, a.action) for a in commands] == [("data", "prepare"), ("tok", "train"), ("train", "base")]
    assert {(a.preset, a.storage, a.run, tuple(overrides(a))) for a in commands} == {
        (PRESET, commands[0].storage, commands[0].run, ())}
    assert commands[0].storage.startswith("s3://")
    assert (cfg.train.backend, cfg.jax.platform) == ("jax", "tpu")


def test_worker_group_requests_the_presets_slice(job: dict, cfg: Config) -> None:
    from ray.util.tpu import get_tpu_worker_resources

    group = _tpu_group(job)
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # an extended resource is requested exactly as limited; KubeRay gives Ray the limit as its TPU resource
    assert requests["google.com/tpu"] == limits["google.com/tpu"]
    chips_per_host = int(limits["google.com/tpu"])
    hosts = group["replicas"] * group["numOfHosts"]
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]  # a slice is never half there
    # what the preset tells Ray, what Ray's tables make of it, and what the pods ask GKE for
    ray_workers, per_worker = get_tpu_worker_resources(cfg.jax.tpu_topology, cfg.jax.tpu_accelerator)
    assert hosts == cfg.train.workers == ray_workers
    assert chips_per_host == per_worker["TPU"]
    assert hosts * chips_per_host == _chips(cfg.jax.tpu_topology)
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[cfg.jax.tpu_accelerator],
        "cloud.google.com/gke-tpu-topology": cfg.jax.tpu_topology,
    }
    assert "google.com/tpu" in {t["key"] for t in spec["tolerations"]}
    # no other accelerator anywhere in the job
    for s in pod_specs(job):
        for c in s["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_tpu_host_holds_the_driver_and_the_training_worker(job: dict, cfg: Config) -> None:
    spec = job["spec"]
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    group = _tpu_group(job)
    (container,) = group["template"]["spec"]["containers"]
    cpus = group["replicas"] * group["numOfHosts"] * float(container["resources"]["limits"]["cpu"])
    assert cpus >= cfg.train.workers * 1 + spec["entrypointNumCpus"]  # Ray Train: 1 CPU per TPU worker


def test_documented_4x4_adaptation_adds_up(job: dict) -> None:
    """The header's recipe for a v6e 4x4 (4 VMs of 4 chips): preset, Ray and the worker group still agree."""
    from ray.util.tpu import get_tpu_worker_resources

    header = JOB_PATH.read_text().split("\napiVersion:")[0]
    sets = re.search(r"`(--set jax\.tpu_topology=4x4 --set train\.workers=\d+)`", header)[1]
    cfg = load_config(preset=PRESET, overrides=re.findall(r"--set (\S+)", sets))
    hosts = int(re.search(r"numOfHosts (\d+)", header)[1])
    chips = int(re.search(r"google\.com/tpu (\d+) ", header)[1])
    workers, per_worker = get_tpu_worker_resources(cfg.jax.tpu_topology, cfg.jax.tpu_accelerator)
    assert cfg.train.workers == workers == hosts and per_worker["TPU"] == chips
    devices = hosts * chips
    assert expected_devices(cfg) == devices and micro_steps(cfg, devices) == 16
    assert devices % cfg.jax.fsdp == 0


def test_every_pod_runs_the_tpu_image_built_with_jax_and_libtpu(job: dict) -> None:
    images = {c["image"] for s in pod_specs(job) for c in s["containers"]}
    assert len(images) == 1 and images.pop().endswith("-tpu")
    # the build command in the header installs the project's jax extra, with jax's TPU flavour
    build = re.search(r'--build-arg EXTRA_PACKAGES="([^"]+)"', JOB_PATH.read_text())[1].split()
    extra = re.search(r"^jax = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)[1]
    wanted = {re.split(r"[\[<>=]", p)[0] for p in re.findall(r'"([^"]+)"', extra)}
    assert {re.split(r"[\[<>=]", p)[0] for p in build} == wanted
    assert any(p.startswith("jax[tpu]") for p in build)
    assert re.search(r'^ARG EXTRA_PACKAGES=""$', (REPO / "docker" / "Dockerfile.cpu").read_text(), re.M)


def test_validation_rejects_a_worker_group_without_the_tpu_slice(job: dict, cfg: Config) -> None:
    """The slice check is not vacuous: a copy asking for 4 chips per host no longer matches the preset."""
    broken = copy.deepcopy(job)
    resources = _tpu_group(broken)["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["google.com/tpu"] = resources["requests"]["google.com/tpu"] = "4"
    with pytest.raises(AssertionError):
        test_worker_group_requests_the_presets_slice(broken, cfg)
