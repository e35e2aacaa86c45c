"""Serving metrics (serving/metrics.py): SPEC's names in a registry of their own, latencies from the
request hooks, counters that follow the engine's totals, and the numbers a real engine run produces."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from nanochat.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from serving.engine.async_engine import AsyncEngine
from serving.engine.engine_process import ProcessEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import SamplingParams
from serving.metrics import MetricsRecorder
from tests.support.gpt_fixtures import scrambled_model

SPEC_NAMES = [
    "nanochat:num_requests_running",
    "nanochat:num_requests_waiting",
    "nanochat:time_to_first_token_seconds",
    "nanochat:inter_token_latency_seconds",
    "nanochat:e2e_request_latency_seconds",
    "nanochat:prompt_tokens_total",
    "nanochat:generation_tokens_total",
    "nanochat:kv_cache_usage_perc",
    "nanochat:prefix_cache_hits_total",
    "nanochat:prefix_cache_queries_total",
    "nanochat:num_preemptions_total",
]
LABELS = {"model_name": "tiny"}


def value(registry: CollectorRegistry, name: str) -> float:
    found = registry.get_sample_value(name, LABELS)
    assert found is not None, f"{name} not in the registry"
    return found


def stats(**totals) -> dict:
    return {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "prefix_cache_queries": 0,
            "prefix_cache_hits": 0, "preemptions": 0, **totals}


def test_every_spec_name_is_exported_with_the_model_label():
    registry = CollectorRegistry()
    MetricsRecorder("tiny", registry)
    text = generate_latest(registry).decode()
    for name in SPEC_NAMES:
        assert f'{name}{{model_name="tiny"}}' in text or f'{name}_count{{model_name="tiny"}}' in text, name


def test_two_recorders_keep_their_own_registries():
    first, second = CollectorRegistry(), CollectorRegistry()
    MetricsRecorder("tiny", first).on_request_start("r", 5)
    MetricsRecorder("tiny", second)
    assert value(first, "nanochat:prompt_tokens_total") == 5
    assert value(second, "nanochat:prompt_tokens_total") == 0


def test_request_hooks_observe_the_latencies_between_them():
    registry = CollectorRegistry()
    recorder = MetricsRecorder("tiny", registry)
    recorder.on_request_start("r", 7, now=10.0)
    recorder.on_first_token("r", now=10.5)
    recorder.on_token("r", 2, now=10.75)  # a step that gave two tokens (two choices): one latency
    recorder.on_token("r", now=11.0)
    recorder.on_finish("r", now=12.0)
    assert value(registry, "nanochat:time_to_first_token_seconds_sum") == 0.5
    assert value(registry, "nanochat:inter_token_latency_seconds_count") == 2
    assert value(registry, "nanochat:inter_token_latency_seconds_sum") == 0.5
    assert value(registry, "nanochat:e2e_request_latency_seconds_sum") == 2.0
    assert value(registry, "nanochat:prompt_tokens_total") == 7
    assert value(registry, "nanochat:generation_tokens_total") == 4
    assert not recorder.requests  # nothing kept after the end


def test_update_sets_gauges_and_adds_the_increase_of_the_engine_totals():
    registry = CollectorRegistry()
    recorder = MetricsRecorder("tiny", registry)
    recorder.update(stats(running=2, waiting=3, kv_cache_usage=0.25, prefix_cache_queries=40,
                          prefix_cache_hits=16, preemptions=1))
    recorder.update(stats(running=1, prefix_cache_queries=50, prefix_cache_hits=16, preemptions=1))
    assert value(registry, "nanochat:num_requests_running") == 1
    assert value(registry, "nanochat:num_requests_waiting") == 0
    assert value(registry, "nanochat:kv_cache_usage_perc") == 0.0
    assert value(registry, "nanochat:prefix_cache_queries_total") == 50
    assert value(registry, "nanochat:prefix_cache_hits_total") == 16
    assert value(registry, "nanochat:num_preemptions_total") == 1
    recorder.update(stats(prefix_cache_queries=8))  # a fresh engine behind the recorder counts from 0
    assert value(registry, "nanochat:prefix_cache_queries_total") == 58


def test_inside_ray_the_names_use_underscores_and_counters_leave_total_to_the_exporter():
    recorder = MetricsRecorder("tiny", use_ray=True)  # Ray's metric objects need no running cluster
    names = {key: metric.info["name"] for key, metric in recorder.metrics.items()}
    assert names["running"] == "nanochat_num_requests_running"
    assert names["prompt_tokens"] == "nanochat_prompt_tokens"
    assert all(":" not in name for name in names.values())
    assert recorder.metrics["ttft"].info["default_tags"] == LABELS


# ---------------------------------------------------------------------------------------------
# through a real engine


@pytest.fixture(scope="module")
def engine_parts():
    tok = Tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 4],
                                        256 + len(SPECIAL_TOKENS) + 20)
    # random weights everywhere: nanochat's init gives every token the same logits
    model = scrambled_model(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                                      n_embd=64), scale=2.0)
    return model, tok


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_an_engine_run_exports_its_usage_and_cache_numbers(engine_parts, engine_core):
    """The same numbers whether the engine steps on a thread or in a process of its own (whose recorder
    calls the parent makes on its behalf)."""
    model, tok = engine_parts
    registry = CollectorRegistry()
    recorder = MetricsRecorder("tiny", registry)
    # 12 blocks of 4 are too few for three requests of ~30 tokens at once: preemptions happen
    settings = dict(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    if engine_core == "process":
        engine = ProcessEngine(model, tok, "cpu", settings, metrics=recorder)
    else:
        engine = AsyncEngine(LLMEngine(model, tok, **settings), metrics=recorder)
    prompt = tok.encode("the quick brown fox jumps over the lazy dog", prepend="<|bos|>")
    params = SamplingParams(temperature=0.0, max_tokens=20)

    async def one(request_id: str) -> tuple[int, int]:
        usage = (0, 0)
        async for event in engine.generate(request_id, prompt, params):
            usage = (event.prompt_tokens, event.completion_tokens)
        return usage

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(*(one(f"r{i}") for i in range(3)))

    try:
        usages = asyncio.run(main())
        final = engine.stats()
    finally:
        engine.shutdown()
    assert value(registry, "nanochat:prompt_tokens_total") == sum(p for p, _ in usages) == 3 * len(prompt)
    assert value(registry, "nanochat:generation_tokens_total") == sum(c for _, c in usages)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert value(registry, f"nanochat:{name}_count") == 3
        assert value(registry, f"nanochat:{name}_sum") > 0
    # n = 1: one token per step, so every token after a request's first follows one latency
    assert value(registry, "nanochat:inter_token_latency_seconds_count") == sum(c - 1 for _, c in usages)
    assert value(registry, "nanochat:prefix_cache_queries_total") == final["prefix_cache_queries"] > 0
    assert value(registry, "nanochat:prefix_cache_hits_total") == final["prefix_cache_hits"] > 0
    assert value(registry, "nanochat:num_preemptions_total") == final["preemptions"] > 0
    assert value(registry, "nanochat:num_requests_running") == 0
    assert value(registry, "nanochat:num_requests_waiting") == 0
    assert value(registry, "nanochat:kv_cache_usage_perc") == 0.0
