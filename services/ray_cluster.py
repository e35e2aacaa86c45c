"""
Connecting to Ray: an embedded local cluster by default, or an existing one by address.

Notable:
- the embedded cluster is started in-process; training jobs start it without the dashboard, whose head, agent
  and state-API traffic take CPU from the workers on a small machine (set NANOCHAT_RAY_DASHBOARD=1 to have it);
  serving keeps it
- RAY_ADDRESS / --ray-address attach to a running cluster (`ray start`, KubeRay); its token auth must be
  configured by the caller's environment (RAY_AUTH_MODE / the head's token), as Ray documents
- the embedded cluster's metrics agent serves Prometheus text at :8080/metrics (every command that starts one:
  training, evaluation and serving), or at $NANOCHAT_METRICS_PORT (`--metrics-port`; 0: a port of Ray's
  choosing). Ray waits a minute and fails, with no word why, when its port is taken: so a port asked for
  that another process holds is a ConfigError before Ray starts, and 8080 held (by a server while a training
  runs) gives way to a free port, logged with the address
- speed settings for small CPU runs are applied only where the user has not set them
- the embedded cluster's workers run at niceness 0: Ray starts workers at 15, beneath its own daemons, which
  suits a node of its own; on a machine shared with the user's programs (and with a client of the server)
  every stage and replica would yield to them, the engine's step included
"""

from __future__ import annotations

import logging
import os

from nanochat.config import ConfigError
from services.network import bindable, free_port

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "NANOCHAT_METRICS_PORT"
DEFAULT_METRICS_PORT = 8080

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


def check_port_free(port: int, source: str, ray_may_choose: bool = True) -> None:
    """A ConfigError naming source unless port is a TCP port no process holds. ray_may_choose: the message
    offers 0, a port of Ray's choosing."""
    choice = " (or 0: a port of Ray's choosing)" if ray_may_choose else ""
    if not 0 < port < 65536:
        raise ConfigError(f"{source}={port}: a TCP port is 1-65535{choice}")
    if not bindable(port, reuse_address=True):
        raise ConfigError(f"{source}={port}: another process holds that port (a `nanochat serve` or another "
                          f"run?); give a free one{choice}")


def embedded_metrics_port() -> int | None:
    """The port an embedded cluster's metrics agent is to serve on: $NANOCHAT_METRICS_PORT (0 or empty: Ray's
    choice, None), which must be free, else 8080 or, while another process holds 8080, a free port."""
    value = os.environ.get(METRICS_PORT_ENV, "").strip()
    if value:
        try:
            port = int(value)
        except ValueError:
            raise ConfigError(f"${METRICS_PORT_ENV}={value!r}: expected a TCP port number") from None
        if port == 0:
            return None
        check_port_free(port, f"${METRICS_PORT_ENV}")
        return port
    if bindable(DEFAULT_METRICS_PORT, reuse_address=True):
        return DEFAULT_METRICS_PORT
    port = free_port()
    log.warning("port %d is taken (a `nanochat serve`, or another run?): this cluster's metrics are at "
                "http://127.0.0.1:%d/metrics", DEFAULT_METRICS_PORT, port)
    return port


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True) -> int | None:
    """Initialise Ray once per process: attach to `address` (or $RAY_ADDRESS), else start a local cluster
    (whose metrics agent serves Prometheus text at embedded_metrics_port(); with the dashboard unless
    `dashboard` is False and $NANOCHAT_RAY_DASHBOARD is not 1). Returns the port of the metrics this call made
    an embedded cluster serve (None: attached, already initialised, or a port of Ray's choosing)."""
    import ray

    if ray.is_initialized():
        return None
    for key, value in _TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return None
    metrics_port = embedded_metrics_port()  # before Ray starts: a port held is a usage error, said at once
    log.info("starting an embedded local Ray cluster%s",
             f" (metrics at http://127.0.0.1:{metrics_port}/metrics)" if metrics_port else "")
    os.environ.setdefault("RAY_worker_niceness", _EMBEDDED_WORKER_NICENESS)
    extra: dict = {"_metrics_export_port": metrics_port} if metrics_port else {}
    if not (dashboard or os.environ.get("NANOCHAT_RAY_DASHBOARD") == "1"):
        extra.update(include_dashboard=False,
                     runtime_env={"worker_process_setup_hook": _without_state_api})
    ray.init(num_cpus=num_cpus, log_to_driver=True, **extra)
    return metrics_port
