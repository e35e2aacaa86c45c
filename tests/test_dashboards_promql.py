"""The Grafana dashboards' PromQL, checked by Prometheus itself (Debian's `prometheus` package).

Notable:
- every panel query is made concrete as Grafana would send it: `$__rate_interval` becomes a window and
  each template variable its "All" value, then `promtool check rules` parses them (fast, no server)
- the live check runs `nanochat serve` on a tiny model (random weights, real checkpoint and tokenizer in
  a local storage folder) with a small KV cache, a real Prometheus scraping its Ray metrics port once a
  second, and a little load: concurrent chat completions (streamed and not) sharing a system prompt, so the
  engine batches, hits its prefix cache and preempts; a completion; an unknown model for the error panels.
  Then every serving panel query, and every dashboard variable's series, must return data through
  Prometheus's range API over the test's window, the way Grafana asks
- the training dashboard needs a training run's gauges (MFU only exists on GPUs), so only its syntax is
  checked here; tests/test_helm.py checks that it queries exactly what services/telemetry.py exports
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "helm" / "nanochat" / "dashboards"
NANOCHAT = str(Path(sys.executable).parent / "nanochat")
RATE_WINDOW = "30s"
RUN = "promql"


def dashboard(name: str) -> dict:
    return json.loads((DASHBOARDS / f"{name}.json").read_text())


def panel_queries(board: dict) -> Iterator[tuple[str, str]]:
    """(panel title, concrete PromQL) for every query of every panel, variables replaced."""
    values = {v["name"]: v.get("allValue", ".*") for v in board["templating"]["list"] if v["type"] != "datasource"}
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
                for name, value in values.items():
                    expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
                yield inner["title"], expr


def test_every_panel_query_is_concrete_after_substitution():
    for name in ("serving", "training"):
        for title, expr in panel_queries(dashboard(name)):
            assert "$" not in expr, f"{name}/{title}: unresolved variable in {expr}"


def test_every_panel_query_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    exprs = [expr for name in ("serving", "training") for _, expr in panel_queries(dashboard(name))]
    rules = [{"record": f"nanochat:check_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# live: nanochat serve + Prometheus


def write_tiny_model(root: Path) -> None:
    """A storage folder as the stages leave it: tokenizer/ and runs/<run>/sft/step_000001/."""
    import torch

    from nanochat.checkpoint import write_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    from services.checkpoints import CheckpointManager
    from services.storage import open_storage

    storage = open_storage(str(root))
    tokenizer = Tokenizer.train_from_iterator(["hello world, how are you today?"] * 20, 256 + len(SPECIAL_TOKENS) + 32)
    storage.write_text("tokenizer/tokenizer.json", tokenizer.to_json())
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                         meta={"stage": "sft", "model_config": vars(model.config)})
        CheckpointManager(storage, RUN, "sft").save(1, tmp)


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout_s} s:\n{log.read_text()[-4000:]}")


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


SYSTEM = "You are nanochat, a small helpful assistant. Answer briefly."  # > 2 KV blocks: prefix-cache hits


def send_load(base: str) -> None:
    """Concurrent chats sharing a system prompt, against a small KV cache: the engine batches, reuses the
    shared prefix's blocks and runs out of blocks (preemptions); plus a completion and a 404."""
    chat = {"model": "nanochat", "max_tokens": 64,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: http("POST", f"{base}/v1/chat/completions",
                                               {**chat, "stream": i % 2 == 1, "seed": i}), range(8)))
    assert all(status == 200 for status, _ in replies), replies
    status, body = http("POST", f"{base}/v1/completions", {"model": "nanochat", "prompt": "hello", "max_tokens": 8})
    assert status == 200, body
    status, _ = http("POST", f"{base}/v1/chat/completions", {**chat, "model": "no-such-model"})
    assert status == 404  # feeds the error panels


def variable_queries(board: dict) -> Iterator[tuple[str, str]]:
    """(variable, series selector) of each label_values() variable, with the other variables' All values."""
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+), *\w+\)", variable["definition"])[1]
            yield variable["name"], selector.replace('=~"$namespace"', '=~".*"')


def range_query(prometheus: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    status, body = http("GET", f"{prometheus}/api/v1/query_range?{params}")
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", f"{expr}: {body[:500]!r}"
    return reply["data"]["result"]


def has_data(result: list[dict]) -> bool:
    """At least one series with a real number (a quantile over no observations is NaN)."""
    return any(math.isfinite(float(value)) for series in result for _, value in series["values"])


@pytest.mark.slow
def test_serving_dashboard_queries_return_data_from_a_live_server(tmp_path):
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    if importlib.util.find_spec("serving.api.app") is None:
        pytest.skip("nanochat serve is not built yet (serving/api/app.py is missing)")
    write_tiny_model(tmp_path / "storage")
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", "NANOCHAT_API_KEYS": ""}
    serve_log, prom_log = tmp_path / "serve.log", tmp_path / "prometheus.log"
    with open(serve_log, "wb") as out:
        serve = subprocess.Popen(
            [NANOCHAT, "--storage", str(tmp_path / "storage"), "--run", RUN,
             "--set", "serve.num_blocks=12", "--set", "serve.num_cpus=1",
             "serve", "--port", str(port), "--metrics-port", str(metrics_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "nanochat", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    with open(prom_log, "wb") as out:
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=out, stderr=subprocess.STDOUT)
    base, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:
        wait_for("nanochat serve", lambda: http("GET", f"{base}/health", timeout=2)[0] == 200, serve, serve_log, 180)
        wait_for("prometheus", lambda: http("GET", f"{prom}/-/ready", timeout=2)[0] == 200, prometheus, prom_log, 60)
        start = time.time()
        board = dashboard("serving")
        queries = [*panel_queries(board), *(("variable " + name, expr) for name, expr in variable_queries(board))]

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries
                    if not has_data(range_query(prom, expr, start - 60, time.time()))]

        # Waves of load until every panel has data: rate() sees no increase in a series' first sample, so a
        # histogram or counter needs a later wave after Ray's agent first exported it (every second here)
        deadline, missing = time.monotonic() + 90, ["(not checked yet)"]
        while missing and time.monotonic() < deadline:
            send_load(base)
            time.sleep(3)
            missing = empty()
        assert not missing, "panels without data:\n  " + "\n  ".join(missing)
    finally:
        stop_process(serve, timeout=30)
        stop_process(prometheus, timeout=30)
