"""`nanochat serve` for real: Ray Serve on an embedded local Ray, a checkpoint from storage, and the official
`openai` client; metrics through Ray's metrics agent, and every serving dashboard panel returning data from a
real Prometheus scraping it; SIGTERM shuts it down cleanly, also during start-up.

The server has a small KV cache (12 blocks), so that the dashboard's load makes the engine preempt, and Ray's
agent exports metrics every second. Its engine steps in a process of its own (serve.engine_core=process), so
the metrics the replica exports are the child's, replayed, and with async scheduling (each step launched
before the one before is read, preemption included); the other servers of the suite run the default engine
thread, each step read before the next."""

import http.client
import json
import shutil
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml

from nanochat.config import load_config
from services.network import free_port
from tests.deploy import dashboards
from tests.support.checkpoints import publish_sft_checkpoint
from tests.support.processes import stop_process, wait_until_answers
from tests.support.serve import assert_streamed_chat_equals_the_unstreamed_reply, nanochat_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "storage"
    publish_sft_checkpoint(root)
    with nanochat_serve(root, "serve.num_blocks=12", "serve.max_ongoing_requests=8", "serve.max_queued_requests=8",
                        "serve.engine_core=process", "serve.async_scheduling=true",
                        env={"RAY_metrics_report_interval_ms": "1000"}) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["nanochat"]
    block_size = load_config().serve.block_size
    assert client.models.retrieve("nanochat").model_extra["max_model_len"] == min(256, 12 * block_size)


def test_tokenize_reports_the_engine_replicas_context(server):
    """Under Ray the ingress holds no engine: the context comes from the replicas with the model."""
    from nanochat.config import load_config

    body = json.dumps({"prompt": "Hello"}).encode()
    request = urllib.request.Request(server.base + "/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    block_size = load_config().serve.block_size
    assert answer["max_model_len"] == min(256, 12 * block_size)  # the model's sequence_len, the cache's size
    assert answer["count"] == len(answer["tokens"]) > 1


def test_chat_completion_with_usage(client):
    reply = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_unstreamed_reply(client):
    assert_streamed_chat_equals_the_unstreamed_reply(client)


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model="nanochat", prompt="Hello", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="nanochat", prompt="Hello", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens <= 10


def test_a_list_of_prompts_streamed_and_not_answers_each_as_alone(client):
    prompts = ["Hello", "The sky"]
    alone = [client.completions.create(model="nanochat", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    whole = client.completions.create(model="nanochat", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in whole.choices] == alone
    streamed = ["", ""]
    for chunk in client.completions.create(model="nanochat", prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == alone
    with pytest.raises(openai.BadRequestError) as e:  # the default policy is first come first served
        client.completions.create(model="nanochat", prompt="Hello", max_tokens=2, extra_body={"priority": -1})
    assert e.value.param == "priority"


def test_responses_streamed_and_not(client):
    ask = dict(model="nanochat", input="Hello", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**ask)
    chat = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=10, temperature=0)
    assert whole.output_text == chat.choices[0].message.content
    events = list(client.responses.create(**ask, stream=True))
    assert events[-1].type == f"response.{whole.status}" and events[-1].response.output_text == whole.output_text


def test_a_function_call_streamed_and_not(client):
    parameters = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                  "additionalProperties": False}
    ask = dict(model="nanochat", messages=[{"role": "user", "content": "Weather?"}], max_tokens=30, temperature=0,
               tools=[{"type": "function", "function": {"name": "weather", "parameters": parameters}}],
               tool_choice={"type": "function", "function": {"name": "weather"}})
    whole = client.chat.completions.create(**ask)
    [call] = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    with client.chat.completions.stream(**ask) as stream:
        [streamed] = stream.get_final_completion().choices[0].message.tool_calls
    assert streamed.function.arguments == call.function.arguments


def test_metrics_are_exported_through_ray(server, client):
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    names = ["ray_nanochat_generation_tokens_total", "ray_nanochat_prompt_tokens_total",
             "ray_nanochat_time_to_first_token_seconds_bucket", "ray_nanochat_kv_cache_usage_perc"]
    # Ray's agent exports each replica's metrics on its own schedule: wait for all of them, not the first
    deadline, text = time.time() + 30, ""
    while time.time() < deadline and not all(name in text for name in names):
        time.sleep(2)
        text = urllib.request.urlopen(server.metrics, timeout=5).read().decode()
    for name in names:
        assert name in text, name


def test_the_ingress_admits_every_request_at_once_unless_bounded():
    """Ray Serve admits 5 requests at a time into a replica unless told otherwise, and holds the rest in its
    proxy unanswered: the API ingress admits every request at once (as Ray Serve LLM's), so that the
    engines batch up to their bound and the ingress refuses past it (the next test sends 200 at once and
    sees the 429s); api_max_ongoing_requests bounds it, with no queue bound in front (whose overflow Serve's
    proxy would answer with a plain-text 503). Read from the application as deployed."""
    from serving.deployments import build_app
    from serving.model_source import ModelSource

    def deployments(*overrides: str) -> tuple:
        cfg = load_config(overrides=["serve.max_ongoing_requests=8", "serve.max_queued_requests=8", *overrides])
        ingress = build_app(cfg, ModelSource("/nowhere", "default", "sft"))._bound_deployment
        (engine,) = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
        return ingress._deployment_config, engine._deployment_config

    ingress, engine = deployments("serve.max_replicas=3")
    assert (engine.max_ongoing_requests, engine.max_queued_requests) == (8, 8)
    assert (ingress.max_ongoing_requests, ingress.max_queued_requests) == (10**9, -1)
    ingress, _ = deployments("serve.api_max_ongoing_requests=100")
    assert (ingress.max_ongoing_requests, ingress.max_queued_requests) == (100, -1)


def test_overload_past_the_engines_bound_gets_a_prompt_429(server):
    """The engine replica runs 8 requests and queues 8 (the fixture's settings): of 200 sent at once, those
    past that bound are answered 429 with Retry-After, as without Ray, sooner than the admitted ones finish
    (not left waiting in Serve's proxy), and the admitted ones complete. How soon is a figure of
    `python -m bench.serving --http`, not a timed assertion. 200 is far past the engines' bound and any small bound
    on the ingress: were the ingress bounded, Serve's proxy would answer the overflow with a plain-text 503
    (it counts a burst's requests as queued until each is assigned) or hold the refusals until there was
    room.

    "At once" is made exact: the 200 connections are opened first and the requests written one after the
    other from one thread, so they reach the server within milliseconds rather than as 200 client threads
    get the CPU. Every reply is 160 tokens long (min_tokens), most of the fixture's 12-block cache, so the
    engine runs one at a time and the admitted requests hold their places well past the arrivals: with
    the model's own short replies a fast CPU finished the first ones while the server was still taking
    the last, and admitted those too."""
    host, port = server.base.removeprefix("http://").split(":")
    body = json.dumps({"model": "nanochat", "max_tokens": 160, "min_tokens": 160,
                       "messages": [{"role": "user", "content": "Hello"}]})
    connections = [http.client.HTTPConnection(host, int(port), timeout=120) for _ in range(200)]
    for connection in connections:
        connection.connect()
    sent = []
    for connection in connections:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        sent.append(time.monotonic())

    def answer(index: int) -> tuple[int, float, str | None]:
        response = connections[index].getresponse()
        text = response.read()
        if response.status not in (200, 429):
            return response.status, time.monotonic() - sent[index], text.decode(errors="replace")
        reply = json.loads(text)
        if response.status == 200:
            assert reply["choices"][0]["message"]["content"] is not None and reply["usage"]["completion_tokens"] == 160
        return response.status, time.monotonic() - sent[index], response.getheader("Retry-After")

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(answer, range(200)))
    for connection in connections:
        connection.close()
    admitted = [seconds for status, seconds, _ in results if status == 200]
    refused = [(seconds, retry) for status, seconds, retry in results if status == 429]
    others = [result for result in results if result[0] not in (200, 429)]
    assert not others, others  # nothing else: no 500, no 503 from Serve's proxy
    assert len(admitted) >= 1 and len(refused) >= 10 and all(retry == "1" for _, retry in refused), results
    assert statistics.median(seconds for seconds, _ in refused) < statistics.median(admitted), results


def test_serving_dashboard_queries_return_data_through_prometheus(server, tmp_path):
    """Every serving panel query, and every dashboard variable's series, returns data through Prometheus's
    range API over the test's window, the way Grafana asks, with a real Prometheus scraping the server."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "nanochat",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}]}))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=out, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        wait_until_answers(f"{prom}/-/ready", prometheus, log, "prometheus", timeout_s=60)
        start = time.time()
        board = dashboards.dashboard("serving")
        queries = [*dashboards.panel_queries(board), *(("variable " + name, expr) for name, expr in dashboards.variable_queries(board))]

        def empty() -> list[str]:
            return [f"{title}: {expr}" for title, expr in queries
                    if not dashboards.has_data(dashboards.range_query(prom, expr, start - 60, time.time()))]

        # Waves of load until every panel has data: rate() sees no increase in a series' first sample, so a
        # histogram or counter needs a later wave after Ray's agent first exported it (every second here)
        deadline, missing = time.monotonic() + 90, ["(not checked yet)"]
        while missing and time.monotonic() < deadline:
            dashboards.send_load(server.base)
            time.sleep(3)
            missing = empty()
        assert not missing, "panels without data:\n  " + "\n  ".join(missing)
    finally:
        stop_process(prometheus, timeout=30)


def test_sigterm_shuts_down_cleanly(server):
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_sigterm_during_start_up_shuts_down_cleanly(tmp_path):
    """A pod can be stopped while it is still starting: once Ray runs (and Serve starts), SIGTERM ends the
    start-up and shuts down cleanly, instead of Ray's own handler aborting the process."""
    root = tmp_path / "storage"
    publish_sft_checkpoint(root)
    # "Started Serve" is logged by serve.start(), before the app deploys
    with nanochat_serve(root, ready_line="Started Serve", timeout_s=120) as server:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-3000:]
        text = server.log.read_text()
    assert "SIGTERM: shutting down" in text and "nanochat serve:" not in text, "stopped before it was ready"
