"""
`nanochat serve`: the Ray Serve application on an embedded local Ray (or an existing cluster), until stopped.

Ready when /health answers; SIGINT or SIGTERM shuts Serve and Ray down cleanly, also during start-up: the API
replica answers /health before serve.run() returns, and a pod may be stopped at any moment, so our handlers
go in right after ray.init() (whose core worker installs its own, which would abort the process) and a
signal interrupts whatever the main thread is waiting on.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from nanochat.config import Config
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


def run_server(cfg: Config, source: ModelSource, *, host: str, port: int, metrics_port: int,
               ray_address: str | None = None) -> None:
    import ray
    from ray import serve

    from serving.deployments import build_app

    # the proxy reads its transport from the environment of the cluster it runs in: for the embedded one,
    # this process's (a user's own RAY_SERVE_PROXY_USE_GRPC wins)
    os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1" if cfg.serve.transport == "grpc" else "0")
    connect(ray_address, metrics_port=metrics_port)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _request_stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg, source), name="nanochat", route_prefix="/")
        print(f"nanochat serve: {source.describe()} at http://{host}:{port}/ (OpenAI API under /v1; "
              f"metrics at http://127.0.0.1:{metrics_port}/metrics)", flush=True)
        while True:
            time.sleep(3600)
    except StopRequested as stop:
        log.info("%s: shutting down", stop)
    serve.shutdown()
    ray.shutdown()
