"""
`nanochat serve`: the Ray Serve application on an embedded local Ray (or an existing cluster), until stopped.

Ready when /health answers; SIGINT or SIGTERM shuts Serve and Ray down cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading

from nanochat.config import Config
from services.ray_cluster import connect
from serving.model_source import ModelSource

log = logging.getLogger(__name__)


def run_server(cfg: Config, source: ModelSource, *, host: str, port: int, metrics_port: int,
               ray_address: str | None = None) -> None:
    import ray
    from ray import serve

    from serving.app import build_app

    connect(ray_address, metrics_port=metrics_port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, source), name="nanochat", route_prefix="/")
    print(f"nanochat serve: {source.describe()} at http://{host}:{port}/ (OpenAI API under /v1; "
          f"metrics at http://127.0.0.1:{metrics_port}/metrics)", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    serve.shutdown()
    ray.shutdown()
