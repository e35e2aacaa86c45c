"""Serving that starts before any model exists and picks up new checkpoints without a restart.

- the engine replica's class on its own (no Ray): on a not-yet-existing S3 prefix (moto on 127.0.0.1) it
  serves nothing and stays healthy; it loads the first checkpoint when `latest` names it, skips a damaged
  one (keeps serving the old), swaps in a newer one while a request in flight finishes on the old engine;
  a --model pinned to a step never reloads.
- `nanochat serve` for real (Ray Serve on an embedded local Ray, a local storage folder that does not exist
  yet), through the official `openai` client: /health 200, no models and 503s with Retry-After; the first
  checkpoint written is served; then 8 clients send requests non-stop while a newer step lands, and none
  fails, and every answer after the swap comes from the new step.

The models are tests/system/chat_server.py's bigram GPTs, each spelling out its own reply, so an answer tells
exactly which checkpoint wrote it.
"""

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import MODEL, write_checkpoint
from nanochat.config import ServeConfig
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.layout import TOKENIZER_KEY, step_dir_name
from services.storage import Storage, open_storage
from serving.deployments import EngineReplica, NoModelLoaded
from serving.deployments import log as app_log
from serving.engine.kv_cache_size import free_memory, kv_cache_block_bytes
from serving.engine.sequence import SamplingParams
from serving.model_source import ModelSource
from tests.support.checkpoints import upload_checkpoint
from tests.support.serve import nanochat_serve
from tests.system.chat_server import reply_model, reply_tokenizer

FIRST = "Hello from the first checkpoint."
NEWER = "Greetings, this is a newer model!"
RELOAD_S = 0.3  # the tests' serve.reload_interval_s


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return reply_tokenizer((FIRST, NEWER))


def publish(storage: Storage, tok: Tokenizer, step: int, reply: str, scratch: Path, model: GPT | None = None) -> None:
    """The tokenizer and an SFT checkpoint of a model that answers `reply` (or of model), laid out as training
    leaves them (the step's files, its manifest, then `latest`)."""
    if not storage.exists(TOKENIZER_KEY):
        storage.write_text(TOKENIZER_KEY, tok.to_json())
    model = model or reply_model(tok, reply_text=reply)
    folder = scratch / step_dir_name(step)
    write_checkpoint(folder, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"stage": "sft", "world_size": 1, "model_config": vars(model.config)})
    upload_checkpoint(storage, "default", "sft", step, folder)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def app_logs(caplog):
    """caplog, with the serving app's log records: Ray's loggers do not reach the root's."""
    logging.getLogger(app_log.name).addHandler(caplog.handler)
    yield caplog
    logging.getLogger(app_log.name).removeHandler(caplog.handler)


def reshaped_model(tok: Tokenizer, **config) -> GPT:
    """A freshly initialised GPT of the reply models' config with config's fields changed."""
    model = GPT(replace(reply_model(tok, reply_text=NEWER).config, **config))
    model.init_weights()
    return model


# ---------------------------------------------------------------------------------------------------------
# the engine replica on its own


def make_replica(uri: str, step: int | None = None, engine_core: str = "thread", **settings) -> EngineReplica:
    cfg = ServeConfig(reload_interval_s=RELOAD_S, num_blocks=16, max_num_seqs=4, num_cpus=1, engine_core=engine_core,
                      **settings)
    return EngineReplica.func_or_class(ModelSource(uri, "default", "sft", step), cfg.model_dump())


def about_64_blocks(tok: Tokenizer) -> float:
    """The kv_cache_memory_fraction of this machine's free memory that holds about 64 KV-cache blocks of the
    reply models."""
    block_bytes = kv_cache_block_bytes(reply_model(tok, reply_text=FIRST), 16, torch.float32)
    return 64 * block_bytes / free_memory("cpu")


def chat_params(tok: Tokenizer) -> dict:
    stops = [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    return asdict(SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=stops))


def prompt(tok: Tokenizer) -> list[int]:
    return tok.render_for_completion({"messages": [{"role": "user", "content": "Hi"}]})


async def reply_of(replica: EngineReplica, tok: Tokenizer, request_id: str) -> str:
    return "".join([e.text async for batch in replica.generate(request_id, prompt(tok), chat_params(tok))
                    for e in batch])


def served_step(replica: EngineReplica) -> int | None:
    return replica.model_info()["step"]


def test_replica_waits_on_an_empty_s3_prefix_loads_the_first_checkpoint_and_skips_a_damaged_one(
        s3_env, tok, tmp_path, app_logs):
    uri = f"{s3_env}/not-created-yet"
    replica = make_replica(uri)
    try:
        assert served_step(replica) is None
        replica.check_health()  # healthy with no model
        with pytest.raises(NoModelLoaded):
            asyncio.run(reply_of(replica, tok, "r0"))

        storage = open_storage(uri)
        publish(storage, tok, 5, FIRST, tmp_path)
        wait_for(lambda: served_step(replica) == 5, 30, "step 5 to be served")
        info = replica.model_info()
        assert Tokenizer.from_json(info["tokenizer_json"]).encode(FIRST) == tok.encode(FIRST)
        assert "tokenizer_json" not in replica.model_info(info["fingerprint"])  # sent only when it changed
        assert asyncio.run(reply_of(replica, tok, "r1")) == FIRST

        # a damaged step 7: its weights are cut short after `latest` names it
        publish(storage, tok, 7, NEWER, tmp_path)
        key = f"runs/default/sft/{step_dir_name(7)}/{MODEL}"
        storage.write_bytes(key, storage.read_bytes(key)[:100])
        wait_for(lambda: "not loading step 7" in app_logs.text, 30, "step 7 to be refused")
        assert served_step(replica) == 5 and asyncio.run(reply_of(replica, tok, "r2")) == FIRST
    finally:
        replica.stop()


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_replica_swaps_in_a_newer_step_while_a_request_finishes_on_the_old_one(local_storage, tok, tmp_path,
                                                                              engine_core):
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, engine_core=engine_core)
    pinned = make_replica(local_storage.uri, step=5)

    async def scenario() -> tuple[str, str]:
        old = replica.generate("old", prompt(tok), chat_params(tok))
        text = "".join(e.text for e in await anext(old))  # in flight on step 5's engine
        publish(local_storage, tok, 9, NEWER, tmp_path)
        deadline = time.monotonic() + 30
        while served_step(replica) != 9:
            assert time.monotonic() < deadline, "step 9 was not swapped in"
            await asyncio.sleep(0.05)
        new = await reply_of(replica, tok, "new")  # a new request goes to step 9 at once
        text += "".join([e.text async for batch in old for e in batch])
        return text, new

    try:
        assert served_step(replica) == 5
        first_engine = replica.loaded.engine
        old_text, new_text = asyncio.run(scenario())
        assert old_text == FIRST and new_text == NEWER
        assert replica.metrics.model_step == 9
        if replica.metrics.registry is not None:  # outside Ray; in a process with Ray up, Ray's agent exports it
            assert replica.metrics.registry.get_sample_value("nanochat:model_step", {"model_name": "nanochat"}) == 9
        wait_for(lambda: not first_engine.alive(), 10, "the replaced engine to shut down")
        time.sleep(3 * RELOAD_S)
        assert served_step(pinned) == 5 and asyncio.run(reply_of(pinned, tok, "p")) == FIRST  # pinned: no reload
    finally:
        replica.stop()
        pinned.stop()


@pytest.mark.parametrize("engine_core", ["thread", "process"])
def test_a_cache_sized_from_free_memory_is_swapped_once_the_old_engine_has_drained(local_storage, tok, tmp_path,
                                                                                   engine_core, app_logs):
    """A KV cache sized as a fraction of the free memory leaves no room for a second beside it (on a GPU):
    the old engine lets its request finish and shuts down before the new one starts. A request that arrives
    meanwhile waits and is answered by the new step; the replica stays healthy throughout."""
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, engine_core=engine_core, kv_cache_memory_fraction=about_64_blocks(tok))
    first_engine = replica.loaded.engine

    async def scenario() -> tuple[str, str]:
        old = replica.generate("old", prompt(tok), chat_params(tok))
        text = "".join(e.text for e in await anext(old))  # in flight on step 5's engine, not read to the end
        publish(local_storage, tok, 9, NEWER, tmp_path)
        deadline = time.monotonic() + 30
        while first_engine.alive():  # draining: it takes no new request
            assert time.monotonic() < deadline, "the old engine did not start draining"
            await asyncio.sleep(0.05)
        assert served_step(replica) == 5 and replica.engine_alive()
        replica.check_health()  # a swap, not a failure: Serve must not replace the replica
        during = asyncio.ensure_future(reply_of(replica, tok, "during"))
        await asyncio.sleep(0.5)
        assert not during.done()  # it waits for the new engine, which waits for the old one's request
        text += "".join([e.text async for batch in old for e in batch])
        return text, await asyncio.wait_for(during, 60)

    try:
        old_text, during_text = asyncio.run(scenario())
        assert old_text == FIRST and during_text == NEWER
        assert served_step(replica) == 9 and not first_engine.core_running()
        # the old engine was down before the new one was built, not after it (as in a swap beside it)
        assert app_logs.text.index("engine of step 5 shut down for the swap (0 requests aborted") < \
            app_logs.text.index(" step 9 on cpu")
    finally:
        replica.stop()


def test_a_checkpoint_that_cannot_be_served_is_refused_before_the_old_engine_drains(local_storage, tok, tmp_path,
                                                                                   app_logs):
    """A reload that would drain the old engine first (a cache sized from free memory) checks the new
    checkpoint first: one whose model cannot take the tokenizer's tokens is refused, and the old engine
    goes on serving, healthy."""
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, kv_cache_memory_fraction=about_64_blocks(tok))
    first_engine = replica.loaded.engine
    try:
        publish(local_storage, tok, 9, NEWER, tmp_path, model=reshaped_model(tok, vocab_size=tok.vocab_size - 8))
        wait_for(lambda: "not loading step 9" in app_logs.text, 30, "step 9 to be refused")
        assert "smaller than the tokenizer's" in app_logs.text and "in the memory of" not in app_logs.text
        assert served_step(replica) == 5 and first_engine.alive()
        replica.check_health()
        assert asyncio.run(reply_of(replica, tok, "after")) == FIRST
    finally:
        replica.stop()


def test_a_drained_swap_whose_new_engine_does_not_fit_serves_the_old_step_again(local_storage, tok, tmp_path,
                                                                               app_logs):
    """A cache of about 8 blocks sized from free memory, then a step whose model has 32 times the KV bytes per
    block: after the old engine drains, the new one's cache holds under 2 blocks and cannot start. The
    replica serves the old step again, healthy, and a request sent during the swap is answered by it."""
    publish(local_storage, tok, 5, FIRST, tmp_path)
    replica = make_replica(local_storage.uri, kv_cache_memory_fraction=about_64_blocks(tok) / 8)
    first_engine = replica.loaded.engine
    try:
        publish(local_storage, tok, 9, NEWER, tmp_path, model=reshaped_model(tok, n_layer=64))
        wait_for(lambda: not first_engine.alive(), 30, "the old engine to drain")
        assert asyncio.run(reply_of(replica, tok, "during")) == FIRST
        wait_for(lambda: "not loading step 9" in app_logs.text, 30, "step 9 to be given up")
        assert "KV-cache blocks" in app_logs.text and "serving step 5 again" in app_logs.text
        assert served_step(replica) == 5 and replica.loaded.engine is not first_engine
        replica.check_health()
        assert asyncio.run(reply_of(replica, tok, "after")) == FIRST
    finally:
        replica.stop()


def test_a_replica_whose_newest_checkpoint_cannot_be_served_stays_up_and_serves_the_next(local_storage, tok,
                                                                                      tmp_path, app_logs):
    """At start, a newest checkpoint that loads but cannot be served (its vocabulary is smaller than the
    tokenizer's) leaves the replica healthy with no model, saying why (tried once, not at every look), and
    the next step that lands is served."""
    publish(local_storage, tok, 5, FIRST, tmp_path, model=reshaped_model(tok, vocab_size=tok.vocab_size - 8))
    replica = make_replica(local_storage.uri)
    try:
        info = replica.model_info()
        assert info["step"] is None and "step 5 of" in info["refused"], info
        assert "smaller than the tokenizer's" in info["refused"] and "newer checkpoint" in info["refused"]
        replica.check_health()
        with pytest.raises(NoModelLoaded):
            asyncio.run(reply_of(replica, tok, "r0"))
        time.sleep(5 * RELOAD_S)
        refusals = {id(r) for r in app_logs.records if "cannot be served" in r.getMessage()}
        assert len(refusals) == 1, "step 5 is not tried again at every look"

        publish(local_storage, tok, 7, NEWER, tmp_path)
        wait_for(lambda: served_step(replica) == 7, 30, "step 7 to be served")
        assert replica.refused is None
        assert asyncio.run(reply_of(replica, tok, "r1")) == NEWER
    finally:
        replica.stop()


# ---------------------------------------------------------------------------------------------------------
# `nanochat serve` on Ray Serve


def lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def get(url: str) -> tuple[int, dict, dict]:
    """(status, headers (names in lower case), JSON body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, lower(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, lower(e.headers), json.loads(e.read())


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, lower(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, lower(e.headers), json.loads(e.read())


def models_step(base: str) -> int | None:
    data = get(base + "/v1/models")[2]["data"]
    return data[0]["step"] if data else None


@pytest.fixture(scope="module", params=["beside", "drain-first"])
def empty_server(request, tok, tmp_path_factory):
    """`nanochat serve` on a storage folder that does not exist yet, ready once serve.run() has deployed the
    app (it prints "nanochat serve:" then). Its KV cache is 64 blocks, so a new checkpoint's engine starts
    beside the old one; or sized from free memory, so the old engine drains first."""
    root = tmp_path_factory.mktemp("reload") / "storage"
    cache = "serve.num_blocks=64" if request.param == "beside" else \
        f"serve.kv_cache_memory_fraction={about_64_blocks(tok)}"
    # the other transport than test_serve_ray's server (grpc, the default)
    with nanochat_serve(root, f"serve.reload_interval_s={RELOAD_S}", cache, "serve.transport=ray",
                        ready_line="nanochat serve:") as server:
        yield server


@pytest.mark.slow
def test_serve_starts_with_no_model(empty_server):
    from openai import APIStatusError, OpenAI

    base = empty_server.base
    assert not empty_server.root.exists() or not any(empty_server.root.iterdir())
    assert get(base + "/health")[0] == 200
    assert get(base + "/v1/models")[2] == {"object": "list", "data": []}
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})]:
        status, headers, answer = post(base + path, body)
        assert status == 503 and headers.get("retry-after", "").isdigit(), (status, headers, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert "No model is trained yet" in answer["error"]["message"], answer
        assert f"nanochat speedrun --storage {empty_server.root}" in answer["error"]["message"], answer
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 503
    assert urllib.request.urlopen(base + "/", timeout=10).status == 200  # the web UI loads


@pytest.fixture(scope="module")
def first_model(empty_server, tok, tmp_path_factory):
    """Step 5 written into the running server's storage, and served: seconds from written to served."""
    written = time.monotonic()
    publish(open_storage(str(empty_server.root)), tok, 5, FIRST, tmp_path_factory.mktemp("ckpt"))
    wait_for(lambda: models_step(empty_server.base) == 5, 60, "step 5 in /v1/models")
    return {"seconds": time.monotonic() - written}


@pytest.mark.slow
def test_the_first_checkpoint_is_served_without_a_restart(empty_server, first_model):
    from openai import OpenAI

    client = OpenAI(base_url=empty_server.base + "/v1", api_key="unused", max_retries=0, timeout=30)
    [card] = client.models.list().data
    assert card.id == "nanochat" and card.model_extra["step"] == 5
    reply = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert reply.choices[0].message.content == FIRST
    print(f"\nfirst checkpoint: written to served in {first_model['seconds']:.2f}s")


@pytest.mark.slow
def test_a_newer_checkpoint_replaces_the_served_one_with_no_failed_request(empty_server, first_model, tok,
                                                                           tmp_path_factory):
    """8 clients send requests non-stop (half of them streamed) while step 9 lands: none fails, and every
    request sent after /v1/models shows step 9 is answered by step 9."""
    from openai import OpenAI

    base = empty_server.base
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    stop = threading.Event()
    swapped_at: list[float] = []
    results: list[tuple[float, str]] = []  # (when sent, reply)
    failures: list[str] = []

    def ask(streamed: bool) -> str:
        messages = [{"role": "user", "content": "Hi"}]
        if streamed:
            chunks = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model="nanochat", messages=messages, temperature=0).choices[0].message.content

    def client_loop(i: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append((sent, ask(streamed=i % 2 == 1)))
            except Exception as e:  # any failure at all counts
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)  # load before the new checkpoint lands
        written = time.monotonic()
        publish(open_storage(str(empty_server.root)), tok, 9, NEWER, tmp_path_factory.mktemp("ckpt9"))
        wait_for(lambda: models_step(base) == 9, 60, "step 9 in /v1/models")
        swapped_at.append(time.monotonic())
        # load after it, until 8 requests sent since have been answered (under a loaded suite a request
        # can take longer than any fixed window)
        wait_for(lambda: sum(sent > swapped_at[0] for sent, _ in list(results)) >= 8 or failures, 60,
                 "8 requests sent after the swap answered")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    before = [reply for sent, reply in results if sent < written]
    after = [reply for sent, reply in results if sent > swapped_at[0]]
    print(f"\nhot swap under 8 clients: {len(results)} requests, {len(failures)} failed; "
          f"step 9 written to served in {swapped_at[0] - written:.2f}s")
    assert failures == [], failures[:5]
    assert before and set(before) == {FIRST}
    assert after and set(after) == {NEWER}, set(after)
    log = empty_server.log.read_text()
    assert "replacing step 5" in log, log[-3000:]


def test_the_serve_app_builds_on_an_empty_storage(tmp_path):
    """KubeRay's import path builds the app without reading storage: nothing there must not fail the
    application (KubeRay would not resubmit it once a model appears)."""
    from serving.deployments import app_builder

    app = app_builder({"storage": str(tmp_path / "nothing-here"), "set": f"serve.reload_interval_s={RELOAD_S}"})
    engine, hint, serve_cfg, _ = app._bound_deployment.init_args
    assert serve_cfg["reload_interval_s"] == RELOAD_S
    assert "nanochat speedrun --storage" in hint and "without a restart" in hint
    assert not (tmp_path / "nothing-here").exists()
