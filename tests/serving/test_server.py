"""What `nanochat serve` puts in its embedded cluster's environment for Ray Serve (serving/server.py)."""

from pathlib import Path

from nanochat.config import ServeConfig
from serving.server import serve_environment

HAPROXY_NAMES = {"RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_LOG_TO_STDERR",
                 "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                 "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_STATS_PORT",
                 "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"}
PORTS = ("HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT", "FALLBACK_PROXY_HTTP_PORT", "FALLBACK_PROXY_GRPC_PORT")


def test_serves_proxy_gets_only_the_transport(tmp_path):
    assert serve_environment(ServeConfig(ingress="proxy"), tmp_path) == {"RAY_SERVE_PROXY_USE_GRPC": "1"}
    assert serve_environment(ServeConfig(ingress="proxy", transport="ray"),
                             tmp_path) == {"RAY_SERVE_PROXY_USE_GRPC": "0"}


def test_haproxy_by_default_gets_the_high_throughput_mode_with_files_and_ports_of_its_own(tmp_path):
    """Two servers on one machine must not share HAProxy's fixed defaults (/tmp/haproxy-serve, ports 8404 and
    9101) nor the fallback proxy's ports (8500, 9500, bound with SO_REUSEPORT: one server's requests would
    reach the other's proxy): the files go in the server's folder, the ports are free ones."""
    assert ServeConfig().ingress == "haproxy"
    env = serve_environment(ServeConfig(), tmp_path)
    assert set(env) == HAPROXY_NAMES | {"RAY_SERVE_PROXY_USE_GRPC"}
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_LOG_TO_STDERR"] == "1"  # the mode's own default would hide the replicas' logs
    for name in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE"):
        assert Path(env[f"RAY_SERVE_HAPROXY_{name}"]).is_relative_to(tmp_path)
    ports = {int(env[f"RAY_SERVE_{name}"]) for name in PORTS}
    assert len(ports) == 4 and not ports & {8404, 9101, 8500, 9500}
