"""
Connecting to Ray: an embedded local cluster by default, or an existing one by address.

Notable:
- the embedded cluster is started in-process; training jobs start it without the dashboard, whose head, agent
  and state-API traffic take CPU from the workers on a small machine (set NANOCHAT_RAY_DASHBOARD=1 to have it);
  serving keeps it
- RAY_ADDRESS / --ray-address attach to a running cluster (`ray start`, KubeRay); its token auth must be
  configured by the caller's environment (RAY_AUTH_MODE / the head's token), as Ray documents
- speed settings for small CPU runs are applied only where the user has not set them
- the embedded cluster's workers run at niceness 0: Ray starts workers at 15, beneath its own daemons, which
  suits a node of its own; on a machine shared with the user's programs (and with a client of the server)
  every stage and replica would yield to them, the engine's step included
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Ray Train defaults are tuned for large jobs; these keep a small run's fit() from waiting on slow health checks
_TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# the raylet reads it when it starts: an embedded cluster's workers at an ordinary process's niceness
_EMBEDDED_WORKER_NICENESS = "0"


# Ray Train's placement-group cleaner asks the dashboard's state API every second whether the job's controller
# still lives, and removes the job's placement group (killing its workers) when the API answers that it does not.
# A cluster without the dashboard still advertises the default one's address, where another cluster on the
# same machine may serve a dashboard that has never heard of the controller; its workers get an address where
# no server can listen instead (port 0), so the question fails at once, as Ray Train tolerates
_NO_STATE_API = "http://127.0.0.1:0"
_PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def _without_state_api() -> None:
    """Worker-process setup hook of an embedded cluster without the dashboard: its state API is nowhere, and
    the cleaner's warning about that would repeat every second (the cluster, with any placement group, ends
    with this process anyway)."""
    os.environ["RAY_API_SERVER_ADDRESS"] = _NO_STATE_API
    logging.getLogger(_PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def connect(address: str | None = None, *, num_cpus: int | None = None, metrics_port: int | None = None,
            dashboard: bool = True) -> None:
    """Initialise Ray once per process: attach to `address` (or $RAY_ADDRESS), else start a local cluster
    (whose metrics agent serves Prometheus text at :metrics_port/metrics when given; with the dashboard unless
    `dashboard` is False and $NANOCHAT_RAY_DASHBOARD is not 1)."""
    import ray

    if ray.is_initialized():
        return
    for key, value in _TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting an embedded local Ray cluster")
        os.environ.setdefault("RAY_worker_niceness", _EMBEDDED_WORKER_NICENESS)
        extra: dict = {"_metrics_export_port": metrics_port} if metrics_port else {}
        if not (dashboard or os.environ.get("NANOCHAT_RAY_DASHBOARD") == "1"):
            extra.update(include_dashboard=False,
                         runtime_env={"worker_process_setup_hook": _without_state_api})
        ray.init(num_cpus=num_cpus, log_to_driver=True, **extra)
