"""
Connecting to Ray: an embedded local cluster by default, or an existing one by address.

Notable:
- the embedded cluster is started in-process with the dashboard on (Ray Train's state API needs it)
- RAY_ADDRESS / --ray-address attach to a running cluster (`ray start`, KubeRay); its token auth must be
  configured by the caller's environment (RAY_AUTH_MODE / the head's token), as Ray documents
- speed settings for small CPU runs are applied only where the user has not set them
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


def connect(address: str | None = None, *, num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """Initialise Ray once per process: attach to `address` (or $RAY_ADDRESS), else start a local cluster
    (whose metrics agent serves Prometheus text at :metrics_port/metrics when given)."""
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
        extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
        ray.init(num_cpus=num_cpus, log_to_driver=True, **extra)
