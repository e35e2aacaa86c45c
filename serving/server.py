"""
`nanochat serve`: the Ray Serve application on an embedded local Ray (or an existing cluster), until stopped.

Ready when /health answers; SIGINT or SIGTERM shuts Serve and Ray down cleanly, also during start-up: the API
replica answers /health before serve.run() returns, and a pod may be stopped at any moment, so our handlers
go in right after ray.init() (whose core worker installs its own, which would abort the process) and a
signal interrupts whatever the main thread is waiting on.

Ray Serve reads serve.transport's proxy side and serve.ingress from the environment of the cluster it runs
in: on the embedded one, this process's, set before Ray starts (serve_environment); on a cluster started
elsewhere, the Ray pods' (the chart sets both).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from nanochat.config import Config, ServeConfig
from services.network import free_port
from services.ray_cluster import connect
from serving.model_source import ModelSource

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception` on
    the way (in Ray Serve's start-up) swallows it."""


def _request_stop(signum: int, _frame) -> None:
    for sig in STOP_SIGNALS:  # a second signal must not interrupt the shutdown itself
        signal.signal(sig, signal.SIG_IGN)
    raise StopRequested(signal.Signals(signum).name)


def run_server(cfg: Config, source: ModelSource, *, host: str, port: int, ray_address: str | None = None) -> None:
    import ray
    from ray import serve

    from serving.deployments import build_app

    # short: Ray puts HAProxy's socket two levels down (a node id between), and HAProxy takes 97 characters
    with tempfile.TemporaryDirectory(prefix="nchp-") as haproxy_dir:
        # Serve reads its transport and ingress from the environment of the cluster it runs in: for the
        # embedded one, this process's (a user's own values win)
        for name, value in serve_environment(cfg.serve, Path(haproxy_dir)).items():
            os.environ.setdefault(name, value)
        metrics_port = connect(ray_address)
        for sig in STOP_SIGNALS:
            signal.signal(sig, _request_stop)
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(cfg, source), name="nanochat", route_prefix="/")
            metrics = f"; metrics at http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
            print(f"nanochat serve: {source.describe()} at http://{host}:{port}/ (OpenAI API under /v1{metrics})",
                  flush=True)
            while True:
                time.sleep(3600)
        except StopRequested as stop:
            log.info("%s: shutting down", stop)
        serve.shutdown()
        ray.shutdown()


def serve_environment(serve_cfg: ServeConfig, haproxy_dir: Path) -> dict[str, str]:
    """What Ray Serve reads from its cluster's environment for serve.transport and serve.ingress. With
    haproxy, the files and ports HAProxy would otherwise take at fixed places (/tmp/haproxy-serve, stats on
    8404, metrics on 9101) are this server's own, so two servers on one machine do not collide, and the
    replicas' logs still reach the console. So are the ports of the Serve proxy HAProxy falls back to (8500
    and 9500): proxies bind with SO_REUSEPORT, so two servers' proxies on one port would both bind it and the
    kernel would hand one server's requests to the other's."""
    env = {"RAY_SERVE_PROXY_USE_GRPC": "1" if serve_cfg.transport == "grpc" else "0"}
    if serve_cfg.ingress == "haproxy":
        # the mode would also stop Serve's replicas logging to stderr: their logs stay where they were
        env |= {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_LOG_TO_STDERR": "1",
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}
    return env
