"""
Serving metrics for Prometheus, named as the user-facing contract fixes them, in vLLM's style (`nanochat:...`), labelled model_name.

Notable:
- latency histograms: time to first token (request arrival to its first token), inter-token latency
  (between consecutive steps that gave a request tokens), end-to-end latency (arrival to the last
  choice's end); counters of prompt and generated tokens; gauges of requests running and waiting and of
  KV cache usage (a fraction in [0, 1], as vLLM's `..._perc`); prefix-cache counters (tokens looked up
  and found, as the block manager counts them) and preemptions, which the engine keeps as running totals:
  update() adds their increase since the last call.
- outside Ray: prometheus_client metrics in the CollectorRegistry given (or a fresh one), so tests and
  each app have their own and a process can hold several. Inside Ray (a Serve replica): ray.util.metrics,
  which Ray's metrics agent exports from every replica; Ray refuses ':' in names, so `nanochat:x` becomes
  `nanochat_x` there (scraped as `ray_nanochat_x`), and counters drop their `_total`, which both
  exporters add back.
- nanochat:model_step is the step of the checkpoint served: it changes when the server swaps in a newer
  one, and is absent until a model is loaded.
- the request hooks keep per-request times in a plain dict, unlocked: call them from one thread
  (AsyncEngine calls them from its engine thread).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

# vLLM's buckets, trimmed: a small model on a CPU is slower per token, never faster than a few ms
TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
E2E_BUCKETS = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]

# key -> (kind, name, description, histogram buckets)
METRICS: dict[str, tuple[str, str, str, list[float] | None]] = {
    "running": ("gauge", "nanochat:num_requests_running", "Requests with a sequence being computed.", None),
    "waiting": ("gauge", "nanochat:num_requests_waiting", "Requests waiting to be scheduled.", None),
    "kv_cache_usage": ("gauge", "nanochat:kv_cache_usage_perc",
                       "Fraction of KV cache blocks held by sequences (1 = full).", None),
    "ttft": ("histogram", "nanochat:time_to_first_token_seconds", "Time from arrival to the first token.",
             TTFT_BUCKETS),
    "itl": ("histogram", "nanochat:inter_token_latency_seconds",
            "Time between consecutive steps that gave a request tokens.", ITL_BUCKETS),
    "e2e": ("histogram", "nanochat:e2e_request_latency_seconds", "Time from arrival to the end of a request.",
            E2E_BUCKETS),
    "prompt_tokens": ("counter", "nanochat:prompt_tokens_total", "Prompt tokens of the requests started.", None),
    "generation_tokens": ("counter", "nanochat:generation_tokens_total", "Tokens generated.", None),
    "prefix_cache_queries": ("counter", "nanochat:prefix_cache_queries_total",
                             "Prompt tokens looked up in the prefix cache.", None),
    "prefix_cache_hits": ("counter", "nanochat:prefix_cache_hits_total",
                          "Prompt tokens found in the prefix cache.", None),
    "preemptions": ("counter", "nanochat:num_preemptions_total",
                    "Sequences preempted for lack of KV cache blocks (recomputed later).", None),
    "model_step": ("gauge", "nanochat:model_step", "Training step of the checkpoint being served.", None),
}
GAUGES = ("running", "waiting", "kv_cache_usage")
TOTALS = ("prefix_cache_queries", "prefix_cache_hits", "preemptions")  # running totals in engine stats


def ray_initialized() -> bool:
    """In a Ray worker or driver, without importing Ray where nothing has."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _prometheus_metric(kind: str, name: str, description: str, buckets: list[float] | None,
                       labels: dict[str, str], registry: Any) -> Any:
    import prometheus_client as prom

    keys = list(labels)
    if kind == "counter":
        metric = prom.Counter(name.removesuffix("_total"), description, keys, registry=registry)
    elif kind == "gauge":
        metric = prom.Gauge(name, description, keys, registry=registry)
    else:
        metric = prom.Histogram(name, description, keys, registry=registry, buckets=buckets)
    return metric.labels(**labels)


def _ray_metric(kind: str, name: str, description: str, buckets: list[float] | None,
                labels: dict[str, str]) -> Any:
    from ray.util import metrics as ray_metrics

    name, keys = name.replace(":", "_"), tuple(labels)
    if kind == "counter":
        metric = ray_metrics.Counter(name.removesuffix("_total"), description, keys)
    elif kind == "gauge":
        metric = ray_metrics.Gauge(name, description, keys)
    else:
        metric = ray_metrics.Histogram(name, description, buckets, keys)
    metric.set_default_tags(labels)
    return metric


@dataclass
class _Times:
    start: float
    last_token: float | None = None


class MetricsRecorder:
    """The serving metrics of one model: request hooks for latencies and tokens, update() for the rest."""

    def __init__(self, model_name: str = "nanochat", registry: Any = None, *, use_ray: bool | None = None):
        """registry: a prometheus_client CollectorRegistry to record into (a fresh one if None and not in Ray).
        use_ray: Ray's metrics instead of prometheus_client; by default when Ray is initialised and no
        registry was given."""
        self.use_ray = (registry is None and ray_initialized()) if use_ray is None else use_ray
        labels = {"model_name": model_name}
        if self.use_ray:
            self.registry = None
            self.metrics = {key: _ray_metric(*spec, labels) for key, spec in METRICS.items()}
        else:
            if registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry()
            self.registry = registry
            self.metrics = {key: _prometheus_metric(*spec, labels, registry) for key, spec in METRICS.items()}
        self.requests: dict[str, _Times] = {}
        self.totals = dict.fromkeys(TOTALS, 0)  # the engine's running totals at the last update()
        self.model_step: int | None = None

    def set_model_step(self, step: int) -> None:
        """The step of the checkpoint now served; re-set with every update(), as exporters drop stale gauges."""
        self.model_step = step
        self.metrics["model_step"].set(step)

    def on_request_start(self, request_id: str, prompt_tokens: int, now: float | None = None) -> None:
        """now: the request's arrival on time.monotonic()'s clock (default: now)."""
        self.requests[request_id] = _Times(time.monotonic() if now is None else now)
        self._inc("prompt_tokens", prompt_tokens)

    def on_first_token(self, request_id: str, count: int = 1, now: float | None = None) -> None:
        """The request's first step with tokens (count of them, over its choices): time to first token."""
        now = time.monotonic() if now is None else now
        times = self.requests.get(request_id)
        if times is not None:
            self.metrics["ttft"].observe(now - times.start)
            times.last_token = now
        self._inc("generation_tokens", count)

    def on_token(self, request_id: str, count: int = 1, now: float | None = None) -> None:
        """A later step that gave the request count tokens: one inter-token latency."""
        now = time.monotonic() if now is None else now
        times = self.requests.get(request_id)
        if times is not None and times.last_token is not None:
            self.metrics["itl"].observe(now - times.last_token)
            times.last_token = now
        self._inc("generation_tokens", count)

    def on_finish(self, request_id: str, now: float | None = None) -> None:
        times = self.requests.pop(request_id, None)
        if times is not None:
            self.metrics["e2e"].observe((time.monotonic() if now is None else now) - times.start)

    def update(self, stats: dict) -> None:
        """Gauges from LLMEngine.stats(), and the counters' increase since the last call."""
        for key in GAUGES:
            self.metrics[key].set(stats[key])
        if self.model_step is not None:
            self.metrics["model_step"].set(self.model_step)
        for key in TOTALS:
            # a total below the last one means a new engine behind this recorder: count from there
            self._inc(key, stats[key] - self.totals[key] if stats[key] >= self.totals[key] else stats[key])
            self.totals[key] = stats[key]

    def _inc(self, key: str, amount: float) -> None:
        if amount > 0:  # Ray's counters refuse 0
            self.metrics[key].inc(amount)
