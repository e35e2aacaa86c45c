"""`nanochat serve` in Ray Serve's high-throughput mode (serve.ingress=haproxy): HAProxy, bundled with
ray[serve], takes the serve port and routes each request straight to the API replica's own HTTP server. The
same API through it with the official `openai` client, the engines' bound answered with 429 + Retry-After as
through Serve's proxy, and SIGTERM leaving no HAProxy behind."""

import http.client
import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.support.checkpoints import publish_sft_checkpoint
from tests.support.serve import assert_streamed_chat_equals_the_unstreamed_reply, nanochat_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-haproxy") / "storage"
    publish_sft_checkpoint(root)
    with nanochat_serve(root, "serve.ingress=haproxy", "serve.num_blocks=12", "serve.max_ongoing_requests=4",
                        "serve.max_queued_requests=4") as server:
        yield server


def haproxies(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "haproxy"]


def config_of(haproxy: psutil.Process) -> Path:
    return Path(next(arg for arg in haproxy.cmdline() if arg.endswith(".cfg")))


def listeners_of(port: int) -> set[str]:
    """Names of the processes holding a socket that listens on `port`, asked process by process: HAProxy's seamless
    reload hands the listening socket itself to the new process, and a system-wide table names only one holder."""
    names = set()
    for pid in psutil.pids():
        try:
            process = psutil.Process(pid)
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
                names.add(process.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone meanwhile (an old HAProxy that drained), or PID 1
            pass
    return names


def test_the_serve_port_is_haproxys(server):
    """What answers on the serve port is HAProxy (not Serve's Python proxy), and the server's HAProxy keeps its
    state in a folder of the server's own. Ray reloads HAProxy as replicas come and go, often just as the server
    turns healthy: the old process hands its socket to the new one and stops, and a scan of the processes can
    read the old one after it let go and miss the new one, so an empty scan is taken again."""
    deadline = time.monotonic() + 10
    while not (listeners := listeners_of(server.port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listeners == {"haproxy"}
    started = haproxies(server.proc)
    assert started
    for haproxy in started:
        assert config_of(haproxy).name == "haproxy.cfg" and "/nchp-" in str(config_of(haproxy))


def test_streamed_chat_through_haproxy_equals_the_unstreamed_reply(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["nanochat"]
    assert_streamed_chat_equals_the_unstreamed_reply(client)


def test_the_engines_bound_is_answered_429_through_haproxy(server):
    """40 requests at once against an engine replica that runs 4 and queues 4: the rest get 429 with
    Retry-After from our API, as through Serve's proxy, and the admitted ones complete."""
    host, port = "127.0.0.1", server.port
    body = json.dumps({"model": "nanochat", "max_tokens": 160, "min_tokens": 160,
                       "messages": [{"role": "user", "content": "Hello"}]})
    connections = [http.client.HTTPConnection(host, port, timeout=120) for _ in range(40)]
    for connection in connections:
        connection.connect()
    for connection in connections:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})

    def answer(connection: http.client.HTTPConnection) -> tuple[int, str | None]:
        response = connection.getresponse()
        reply = json.loads(response.read())
        if response.status == 200:
            assert reply["usage"]["completion_tokens"] == 160
        return response.status, response.getheader("Retry-After")

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(answer, connections))
    for connection in connections:
        connection.close()
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429} and statuses.count(429) >= 10, results
    assert {retry for status, retry in results if status == 429} == {"1"}


def test_sigterm_stops_haproxy_and_removes_its_folder(server):
    proc = server.proc
    started = haproxies(proc)
    folder = next(parent for parent in config_of(started[0]).parents if parent.name.startswith("nchp-"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, server.log.read_text()[-3000:]
    psutil.wait_procs(started, timeout=10)
    assert not any(haproxy.is_running() for haproxy in started) and not folder.exists()
