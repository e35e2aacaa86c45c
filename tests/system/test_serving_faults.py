"""Faults and endings of the serving stack, on real parts: the API under uvicorn over a real AsyncEngine
running a tiny GPT, driven through HTTP (the official `openai` client or httpx), and the Ray Serve engine
replica's class on its own.

- an engine step that raises (a model whose forward breaks after some calls, as a persistent CUDA error
  would) ends the engine: the streams in flight get an error, /health answers 503 in OpenAI's shape, new
  requests a 503 with Retry-After, and the replica's check_health raises so that Serve replaces it;
- clients that leave mid-stream free their KV blocks (counted), while the others finish;
- draining: new requests get 503 with Retry-After and /health 503 at once, a request that can finish in the
  drain time does, one that cannot ends with an error event, and every block is free afterwards.
"""

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from serving.engine.engine_process import ProcessEngine
from serving.engine.llm_engine import LLMEngine
from tests.support.gpt_fixtures import scrambled_model
from tests.system.chat_server import reply_tokenizer
from tests.system.test_api import ERROR_KEYS, all_blocks_free, serve, tiny_model, tiny_tokenizer, wait_until
from tests.system.test_serve_reload import FIRST, NEWER, chat_params, make_replica, prompt, publish, reply_of

INJECTED = "CUDA error: an illegal memory access was encountered (injected)"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def faulty(model: GPT, *, delay_s: float = 0.0, fail_after: int | None = None) -> GPT:
    """The model, its forward made to take delay_s and to raise from call fail_after + 1 on (every call after,
    like a device that has gone bad)."""
    real = model.forward_cached
    calls = 0

    def forward_cached(idx, cache, logits_at=None, prev_idx=None):
        nonlocal calls
        calls += 1
        if fail_after is not None and calls > fail_after:
            raise RuntimeError(INJECTED)
        time.sleep(delay_s)
        return real(idx, cache, logits_at, prev_idx)

    model.forward_cached = forward_cached
    return model


def make_engine(model: GPT, tok: Tokenizer, num_blocks: int = 64) -> AsyncEngine:
    return AsyncEngine(LLMEngine(model, tok, num_blocks=num_blocks, block_size=8, max_num_seqs=8,
                                 max_num_batched_tokens=64))


def windowed_model(tok: Tokenizer) -> GPT:
    """tiny_model with a sliding window in its first layer: an engine of 128 blocks keeps that layer's
    KV in a window pool of its own (64 blocks for its window of 24 tokens), the other's in 192 blocks."""
    config = dataclasses.replace(tiny_model(tok).config, window_pattern="SL")
    return scrambled_model(config, scale=2.0)


def completion(max_tokens: int, stream: bool = True, prompt: str = "hello world") -> dict:
    """A completion of exactly max_tokens tokens (min_tokens keeps the stop tokens out)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def events_of_lines(lines) -> list[dict | str]:
    return [line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in lines if line]


def events_of(response: httpx.Response) -> list[dict | str]:
    return events_of_lines(response.iter_lines())


def assert_503(response: httpx.Response) -> dict:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "server_error"
    return error


# ---------------------------------------------------------------------------------------------
# a failing engine


def test_a_failing_engine_step_stops_the_engine_and_health_answers_503(tok):
    engine = make_engine(faulty(tiny_model(tok), delay_s=0.01, fail_after=6), tok)
    try:
        with serve(create_app(engine, tok)) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.APIError):  # an error event mid-stream (or a 503 before the first token)
                for _ in client.completions.create(model="nanochat", prompt="hello", max_tokens=40, stream=True,
                                                   extra_body={"min_tokens": 40}):
                    pass
            assert wait_until(lambda: not engine.alive())
            assert_503(http.get("/health"))
            assert_503(http.post("/v1/completions", json=completion(3, stream=False)))
            assert INJECTED in str(engine.failure)
    finally:
        engine.shutdown()
    assert not engine.core_running()


def test_a_request_in_the_inbox_when_the_step_fails_gets_the_error_too(tok):
    engine = make_engine(faulty(tiny_model(tok), delay_s=0.05, fail_after=3), tok)
    try:
        with serve(create_app(engine, tok)) as url:
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=completion(30, False),
                                                             timeout=30), range(4)))
        assert all(r.status_code in (500, 503) for r in results), [r.status_code for r in results]
        assert engine.unfinished() == 0
    finally:
        engine.shutdown()


def test_the_engine_replica_fails_its_health_check_once_its_engine_failed(local_storage, tmp_path):
    tok = reply_tokenizer((FIRST, NEWER))
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, step=5)
    try:
        replica.check_health()
        assert asyncio.run(reply_of(replica, tok, "ok")) == FIRST
        faulty(replica.loaded.engine.engine.runner.model, fail_after=0)

        async def failing() -> None:
            async for _ in replica.generate("broken", prompt(tok), chat_params(tok)):
                pass

        with pytest.raises(RuntimeError, match="engine step failed"):
            asyncio.run(failing())
        assert wait_until(lambda: not replica.loaded.engine.alive())
        with pytest.raises(RuntimeError, match="injected"):
            replica.check_health()
    finally:
        replica.stop()


def test_an_engine_replica_whose_engine_process_dies_fails_its_health_check(local_storage, tmp_path):
    """serve.engine_core=process: the replica serves from its child process, and a child that dies (killed,
    out of memory) makes the replica unhealthy, so Serve replaces it."""
    tok = reply_tokenizer((FIRST, NEWER))
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, step=5, engine_core="process")
    try:
        assert isinstance(replica.loaded.engine, ProcessEngine)
        replica.check_health()
        assert asyncio.run(reply_of(replica, tok, "ok")) == FIRST
        os.kill(replica.loaded.engine.pid, signal.SIGKILL)
        assert wait_until(lambda: not replica.loaded.engine.alive())
        with pytest.raises(RuntimeError, match="the engine process exited with code -9"):
            replica.check_health()
    finally:
        replica.stop()


def test_the_engine_replica_sends_a_step_of_tokens_per_object_not_one_per_token(local_storage, tmp_path):
    """Every item the replica yields is one Ray object to the ingress: a step's events go together (the
    4 choices' tokens), and a consumer that fell behind gets every step it missed in one item. (The first
    item may hold more than one step too, where the engine ran ahead before it was read.)"""
    tok = reply_tokenizer((FIRST, NEWER))
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, step=5)
    params = {**chat_params(tok), "n": 4}

    async def items() -> list[list]:
        stream = replica.generate("n4", prompt(tok), params)
        got = [await anext(stream)]
        # fall behind: the engine runs the request to its end meanwhile
        assert await asyncio.to_thread(wait_until, lambda: replica.loaded.engine.stats()["running"] == 0, 30)
        got += [item async for item in stream]
        return got

    try:
        got = asyncio.run(items())
    finally:
        replica.stop()
    events = [e for item in got for e in item]
    assert "".join(e.text for e in events if e.index == 0) == FIRST
    assert {e.finish_reason for e in events if e.token_id is None} == {"stop"} and len(events) > 4 * 6
    per_choice = Counter(e.index for e in got[0])
    assert set(per_choice) == {0, 1, 2, 3} and len(set(per_choice.values())) == 1  # whole steps: one per choice
    assert len(got[1]) > 4  # several steps at once
    assert len(got) < len(events) / 4


# ---------------------------------------------------------------------------------------------
# clients that leave


@pytest.mark.parametrize("window_pool", [False, True], ids=["one-pool", "window-pool"])
def test_clients_leaving_mid_stream_free_their_blocks_while_the_others_finish(tok, window_pool):
    # slow steps (60 tokens take ~3 s): the finishers must still hold their blocks when all five are counted,
    # however long the five clients take to start on a busy machine
    model = windowed_model(tok) if window_pool else tiny_model(tok)
    engine = make_engine(faulty(model, delay_s=0.05), tok, num_blocks=128 if window_pool else 64)
    assert (engine.stats()["total_window_blocks"] > 0) == window_pool
    try:
        with serve(create_app(engine, tok)) as url:
            total = engine.stats()["total_blocks"]
            assert engine.stats()["free_blocks"] == total
            started = threading.Barrier(6)  # five streams and this thread
            counted = threading.Event()

            def leave(prompt: str) -> None:
                with httpx.Client(base_url=url, timeout=30) as http, \
                        http.stream("POST", "/v1/completions", json=completion(60, prompt=prompt)) as r:
                    lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
                    next(lines)
                    started.wait(timeout=20)  # every stream holds its blocks now
                    counted.wait(timeout=20)  # ... and they have been counted: leave mid-stream

            def finish(prompt: str) -> list:
                with httpx.Client(base_url=url, timeout=60) as http, \
                        http.stream("POST", "/v1/completions", json=completion(60, prompt=prompt)) as r:
                    lines = r.iter_lines()
                    first = next(lines)
                    started.wait(timeout=20)
                    return events_of_lines([first, *lines])

            with ThreadPoolExecutor(5) as pool:
                # different prompts: identical greedy streams would share their full blocks
                leavers = [pool.submit(leave, f"the fox {i}") for i in range(3)]
                finishers = [pool.submit(finish, f"the dog {i}") for i in range(2)]
                started.wait(timeout=20)
                assert wait_until(lambda: engine.stats()["running"] == 5, 10), engine.stats()
                in_use = total - engine.stats()["free_blocks"]
                counted.set()
                for f in leavers:
                    f.result()
                assert wait_until(lambda: engine.stats()["running"] <= 2, 10), engine.stats()
                finished = [f.result() for f in finishers]
            assert in_use >= 5  # five streams, a block each at least
            for events in finished:
                assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            assert wait_until(lambda: all_blocks_free(engine)), engine.stats()
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------
# draining


def test_draining_lets_short_requests_finish_refuses_new_ones_and_cuts_long_ones(tok):
    engine = make_engine(faulty(tiny_model(tok), delay_s=0.05), tok)  # ~20 tokens a second
    with serve(create_app(engine, tok)) as url, httpx.Client(base_url=url, timeout=30) as http:
        results: dict[str, list] = {}

        def stream(name: str, max_tokens: int) -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=completion(max_tokens), timeout=30) as r:
                results[name] = events_of(r)

        threads = [threading.Thread(target=stream, args=("short", 15)),
                   threading.Thread(target=stream, args=("long", 80))]
        for t in threads:
            t.start()
        assert wait_until(lambda: engine.stats()["running"] == 2), engine.stats()
        drained = threading.Thread(target=lambda: results.setdefault("left", [engine.drain(2.0)]))
        drained.start()
        assert wait_until(lambda: not engine.alive())
        assert_503(http.get("/health"))
        assert_503(http.post("/v1/completions", json=completion(3, stream=False)))
        for t in [*threads, drained]:
            t.join(timeout=30)
    assert results["left"] == [1]  # the long one
    short, long = results["short"], results["long"]
    assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
    assert set(long[-1]) == {"error"} and long[-1]["error"]["code"] == "unavailable"
    assert not engine.core_running()
    assert all_blocks_free(engine)


def test_serve_drain_timeout_is_the_graceful_shutdown_of_both_deployments():
    """Under Ray Serve the drain is Serve's own: on shutdown (SIGTERM to `nanochat serve`) a replica gets no
    new requests and its requests in flight have graceful_shutdown_timeout_s to finish."""
    from nanochat.config import load_config
    from serving.deployments import build_app
    from serving.model_source import ModelSource

    cfg = load_config(overrides=["serve.drain_timeout_s=7.5"])
    ingress = build_app(cfg, ModelSource("/nowhere", "default", "sft"))._bound_deployment
    (engine,) = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    assert engine._deployment_config.graceful_shutdown_timeout_s == 7.5
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 7.5
    with pytest.raises(ValueError, match="drain_timeout_s"):
        load_config(overrides=["serve.drain_timeout_s=-1"])
