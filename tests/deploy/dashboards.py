"""
The Grafana dashboards' queries, made concrete as Grafana sends them, and what the live check needs: load that
makes every serving panel have data, and Prometheus's range API. Used by tests/deploy/test_dashboards_promql.py
(syntax) and tests/system/test_serve_ray.py (every serving panel against the live server).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parents[2] / "helm" / "nanochat" / "dashboards"
RATE_WINDOW = "30s"


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
