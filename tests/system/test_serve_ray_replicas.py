"""Two engine replicas under Ray Serve, in this process's own local Ray, driven over HTTP with the official
`openai` client: prefix-aware routing against Serve's default, an engine replica killed during 32 streams,
and the API's /health following a failed engine.

Each replica is read directly (its record_routing_stats, which Serve's routers collect too): requests,
free KV blocks and prefix-cache counters. Replicas are found by their actor names and killed with ray.kill,
as a crashed process would end. A model source whose forward starts failing once a flag file exists gives an
engine failure on demand inside a real replica."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from nanochat.config import load_config
from services.network import free_port
from serving.deployments import build_app
from serving.model_source import ModelSource
from tests.support.checkpoints import publish_sft_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@dataclass(frozen=True)
class FlakySource(ModelSource):
    """The checkpoint, with a forward that raises (as a device gone bad would) while `flag` exists."""

    flag: str = ""

    def load(self, device="cpu"):
        model, tokenizer, step = super().load(device)
        real, flag = model.forward_cached, Path(self.flag)

        def forward_cached(idx, cache, logits_at=None, prev_idx=None):
            if flag.exists():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return real(idx, cache, logits_at, prev_idx)

        model.forward_cached = forward_cached
        return model, tokenizer, step


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas") / "storage"
    publish_sft_checkpoint(root)
    port = free_port()
    # the replicas unpickle FlakySource from this file, imported under pytest's name for it
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    if ray.is_initialized():  # an earlier test in this process left its local Ray: this one needs its own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"root": root, "base": f"http://127.0.0.1:{port}", "flag": root.parent / "fail-now"}
    serve.shutdown()
    ray.shutdown()


def deploy(cluster, name: str, *settings: str) -> openai.OpenAI:
    """The app with two engine replicas (a small KV cache each) under /name; an openai client for it."""
    cfg = load_config(overrides=["serve.min_replicas=2", "serve.max_replicas=2", "serve.num_cpus=0",
                                 "serve.reload_interval_s=0", "serve.max_ongoing_requests=32",
                                 "serve.max_num_seqs=32", *settings])
    source = FlakySource(str(cluster["root"]), "default", "sft", 5, flag=str(cluster["flag"]))
    serve.run(build_app(cfg, source), name=name, route_prefix=f"/{name}")
    return openai.OpenAI(base_url=f"{cluster['base']}/{name}/v1", api_key="unused", max_retries=0, timeout=60)


def replicas(app: str) -> dict[str, ray.actor.ActorHandle]:
    """The app's engine replica actors by name."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#engine#")]
    return {name: ray.get_actor(name, namespace="serve") for name in names}


def stats(app: str) -> dict[str, dict]:
    return {name: ray.get(actor.record_routing_stats.remote(), timeout=30) for name, actor in replicas(app).items()}


def replaced(app: str, victim: str, timeout_s: float = 90) -> dict[str, dict]:
    """The stats of the app's two engine replicas once the victim is gone and its replacement answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = replicas(app)
        if len(names) == 2 and victim not in names:
            try:
                return stats(app)
            except ray.exceptions.RayError:  # named already, still starting
                pass
        time.sleep(1)
    raise AssertionError(f"no replacement for {victim} within {timeout_s} s: {replicas(app)}")


def serves_on_both(client: openai.OpenAI, app: str) -> None:
    """Requests until each of the app's two replicas has run one: serve.run returns once both are up, but the
    ingress's router may learn of the second a moment later, and until then routes everything to the first."""
    for i in range(40):
        client.completions.create(model="nanochat", prompt=f"warm-up {i}", max_tokens=1)
        if all(s["prefix_cache_queries"] for s in stats(app).values()):
            return
    raise AssertionError(f"the router kept to one replica for 40 requests: {stats(app)}")


def shared_prefix_prompt(group: int, i: int) -> str:
    """~100 tokens (7 KV blocks) shared by a group, then a question of its own."""
    body = " ".join(WORDS[(group * 5 + k) % len(WORDS)] + str(group) for k in range(20))
    return f"{body} question {i}?"


def routed_hit_rate(client: openai.OpenAI, app: str) -> tuple[float, list[set[str]]]:
    """4 groups of 6 requests sharing a long prefix, interleaved and rotated a place each round (A B C D,
    B C D A, ...), one at a time: the prefix cache's hit rate over them, and for each group the replicas that
    ran it. Rotated, so that a router alternating between the two replicas (as Serve's can, when the one
    it just used still looks busy) splits every group between them too, rather than keeping A and C on one
    and B and D on the other by accident."""
    serves_on_both(client, app)
    start = before = stats(app)
    where: list[set[str]] = [set() for _ in range(4)]
    for i in range(6):
        for group in [(i + k) % 4 for k in range(4)]:
            client.completions.create(model="nanochat", prompt=shared_prefix_prompt(group, i), max_tokens=2)
            now = stats(app)
            where[group] |= {name for name in now if now[name]["prefix_cache_queries"]
                             != before.get(name, {}).get("prefix_cache_queries", 0)}
            before = now
    queries, hits = (sum(before[name][key] - start[name][key] for name in start)
                     for key in ("prefix_cache_queries", "prefix_cache_hits"))
    return hits / queries, where


def test_requests_sharing_a_prefix_go_to_the_replica_that_holds_it(cluster):
    """Each replica's cache holds two groups' prefixes but not four: routed by prefix, each group stays on
    one replica and hits its cache; Serve's default router sends each group to both, where the four
    prefixes evict each other."""
    settings = ("serve.num_blocks=16", "serve.block_size=16")
    prefix = routed_hit_rate(deploy(cluster, "prefix", *settings, "serve.routing=prefix"), "prefix")
    serve.delete("prefix")
    plain = routed_hit_rate(deploy(cluster, "plain", *settings, "serve.routing=power_of_two"), "plain")
    serve.delete("plain")
    print(f"prefix-cache hit rate: routed by prefix {prefix[0]:.2f}, by power of two choices {plain[0]:.2f}")
    assert all(len(ran) == 1 for ran in prefix[1]), prefix
    assert prefix[0] >= 0.7, prefix
    assert any(len(ran) == 2 for ran in plain[1]), plain
    assert plain[0] < prefix[0] - 0.15, (prefix, plain)


STREAM_TOKENS = 120  # long enough that no stream ends before the last has its first token


def stream(client: openai.OpenAI, prompt: str, started: threading.Barrier) -> tuple[str, int]:
    """A streamed completion of STREAM_TOKENS tokens: ("ok", completion tokens) or ("error", chunks before the
    error event, which must be in OpenAI's shape)."""
    chunks, tokens = 0, 0
    try:
        for chunk in client.completions.create(model="nanochat", prompt=prompt, max_tokens=STREAM_TOKENS, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"min_tokens": STREAM_TOKENS}):
            if chunks == 0:
                started.wait(timeout=60)
            chunks += 1
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    except openai.APIError as e:
        assert isinstance(e.body, dict) and set(e.body) >= {"message", "type", "code"}, e.body
        return "error", chunks
    return "ok", tokens


def test_killing_an_engine_replica_during_32_streams(cluster):
    """Its clients get an error event, the others finish, Serve starts a replacement that serves, and no KV
    block stays taken on any replica."""
    client = deploy(cluster, "faults", "serve.num_blocks=256", "serve.routing=power_of_two")
    serves_on_both(client, "faults")
    before = replicas("faults")
    started = threading.Barrier(33)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(stream, client, f"story {i}: once upon a time", started) for i in range(32)]
        started.wait(timeout=60)  # every stream has its first token
        holding = {name: s["running"] + s["waiting"] for name, s in stats("faults").items()}
        victim = max(holding, key=holding.get)
        ray.kill(before[victim])
        outcomes = [f.result(timeout=120) for f in futures]
    print(f"streams per replica when one was killed: {holding}")
    failed = [o for o in outcomes if o[0] == "error"]
    # the victim's streams (less any that finished between the count and the kill), not the other replica's
    assert 0 < len(failed) <= holding[victim] and len(failed) < 32, (holding, outcomes)
    assert all(tokens == STREAM_TOKENS for status, tokens in outcomes if status == "ok"), outcomes
    now = replaced("faults", victim)
    replacement = (set(now) - set(before)).pop()
    for i in range(20):  # until the replacement has served one
        client.completions.create(model="nanochat", prompt=f"after {i}", max_tokens=4)
        if stats("faults")[replacement]["prefix_cache_queries"]:
            break
    assert stats("faults")[replacement]["prefix_cache_queries"] > 0
    for name, s in stats("faults").items():
        assert s["free_blocks"] == s["total_blocks"] and s["free_window_blocks"] == s["total_window_blocks"], (name, s)
        assert s["running"] == s["waiting"] == 0, (name, s)


def test_the_api_health_follows_a_failed_engine(cluster):
    """A failing engine step marks the API's /health 503 (not only the engine replica's own check), requests
    get 503; once the fault is gone Serve's replacements make it 200 again."""
    deploy(cluster, "health", "serve.num_blocks=64")
    base = f"{cluster['base']}/health"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    cluster["flag"].touch()
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(4):  # both replicas' engines fail on their next step
                http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and http.get("/health").status_code == 200:
                time.sleep(0.2)
            r = http.get("/health")
            assert r.status_code == 503 and set(r.json()["error"]) >= {"message", "type", "code"}, r.text
    finally:
        os.remove(cluster["flag"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and httpx.get(f"{base}/health", timeout=10).status_code != 200:
        time.sleep(1)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    serve.delete("health")
