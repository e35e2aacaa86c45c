"""
The Ray Serve application: an API ingress in front of engine replicas.

Notable:
- `EngineReplica` holds one continuous-batching engine (its own paged KV cache) and streams TokenEvents;
  it autoscales on ongoing requests, and Ray Serve's `max_queued_requests` bounds the queue in front of it.
  The engine steps on a thread of the replica or, with serve.engine_core "process", in a child process of
  its own (serving/engine/engine_process.py), which loads the model onto the device: the replica keeps it
  on the CPU only until it has handed it over
- `Ingress` builds the same FastAPI app the tests run without Ray (`serving/api/app.py`), talking to the
  engine replicas through a handle that looks like an AsyncEngine (`RemoteEngine`); by default it admits
  every request at once (serve.api_max_ongoing_requests 0, as Ray Serve LLM's ingress), so overload meets
  the engines' bound and gets a 429 with Retry-After, as it does without Ray, instead of waiting in Serve's
  proxy for room in the ingress
- tokens travel from a replica to the ingress in lists, one message per engine step (or more steps when
  the ingress fell behind), not one per token; with serve.transport "grpc" the messages go over Serve's
  gRPC channels between replicas instead of the object store (the per-request and per-message cost of the
  hop is what limits many concurrent streams on a few cores)
- a client that disconnects cancels its stream; the cancellation reaches the replica, whose engine aborts
  the request and frees its blocks
- requests go to the engine replica that last ran the longest prefix of their prompt (serve.routing
  "prefix", serving/prefix_router.py), so a shared prefix stays in one replica's cache; "power_of_two" is
  Serve's default router
- `app_builder` is the import path for KubeRay's RayService (`serving.deployments:app_builder`) and `serve run`
- the app deploys with nothing in storage yet: an engine replica without a model answers /health, and the
  API lists no model and answers 503 saying how to train one. Each replica looks at the stage's `latest`
  marker every serve.reload_interval_s and loads what it names (model and tokenizer) beside the model it
  serves; only once it is loaded does it take new requests, while those in flight finish on the old
  engine, which then shuts down (so for a while a replica holds two models and two KV caches). A KV cache
  sized from free memory (serve.kv_cache_memory_fraction; a GPU's by default) leaves no room for a second:
  then the old engine drains first, new requests waiting, and the new engine starts in its memory (should
  it not fit there, the old step is loaded again). A checkpoint that fails to load is logged and skipped;
  a --model pinned to a step never reloads. The step served is the gauge nanochat:model_step and the
  `step` of /v1/models' entry. A replica whose newest checkpoint loads but cannot be served (another
  vocabulary, no room for it) stays up without a model, its 503 saying why, and serves the next step that
  lands, rather than fail at start again and again.
- /health and Serve's health check follow the engine: a failed engine step stops the engine, so the
  replica's check_health raises and Serve replaces it; the API's /health asks an engine replica (at most
  every REFRESH_S) and answers 503 while the engine it reaches has failed or is draining
- shutdown is graceful: Serve stops sending a replica requests and lets those in flight finish for up to
  serve.drain_timeout_s (graceful_shutdown_timeout_s of both deployments) before it stops the replica, whose
  engine then aborts what is left (its clients get an error event)
- the ingress asks a replica which model is served (step, tokenizer) at most every REFRESH_S, so a swap
  reaches /v1/models within a second or so; it waits on that answer only while it knows of no model
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError

from nanochat.checkpoint import CorruptCheckpoint
from nanochat.config import Config, ServeConfig, load_config
from nanochat.tokenizer import Tokenizer
from services.storage import KeyNotFound, StorageError
from serving.api.app import ServedModel
from serving.api.schemas import now
from serving.engine.async_engine import AsyncEngine, EngineClient, EngineStopped, QueueFull
from serving.engine.engine_process import ProcessEngine
from serving.engine.kv_cache_size import resolve_kv_memory_fraction
from serving.engine.llm_engine import TokenEvent, build_engine, check_servable
from serving.engine.sequence import SamplingParams
from serving.metrics import MetricsRecorder
from serving.model_source import ModelSource
from serving.prefix_router import PrefixAffinityRouter

# a child of Serve's logger: Serve sends it, with the replica's name, to the replica's log and the driver's console
log = logging.getLogger("ray.serve.nanochat")

REFRESH_S = 1.0  # how stale the ingress's idea of the served model, and of the engine's health, may get
HEALTH_TIMEOUT_S = 2.0  # an engine replica that does not say within this whether its engine is alive is busy
RETIRE_TIMEOUT_S = 600.0  # a replaced engine shuts down once its requests finish, or after this long
SWAP_POLL_S = 0.05  # how often a request that arrived while the old engine drains looks for the new one


class NoModelLoaded(RuntimeError):
    """The replica has no model yet (the API answers 503)."""


@dataclass(frozen=True)
class Loaded:
    """A model being served by a replica: its engine, checkpoint step and tokenizer."""

    engine: EngineClient
    step: int
    tokenizer_json: str
    fingerprint: str  # of tokenizer_json: the ingress fetches the tokenizer only when this changes
    created: int


@serve.deployment(name="engine", health_check_period_s=10, graceful_shutdown_timeout_s=30)
class EngineReplica:
    def __init__(self, source: ModelSource, serve_cfg: dict[str, Any]):
        import torch

        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.source = source
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # an engine process loads the model onto the device itself: this process keeps it off the GPU
        self._load_device = "cpu" if self.cfg.engine_core == "process" else self.device
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        # inside Ray the recorder publishes through Ray's metrics agent (ray_nanochat_* on every replica)
        self.metrics = MetricsRecorder(self.cfg.model_name)
        self.loaded: Loaded | None = None
        self.refused: str | None = None  # while no model is served: why the newest checkpoint is not
        self._refused_step: int | None = None
        self._stopping = threading.Event()
        self._swapping = threading.Event()  # set while the old engine drains before the new one starts
        if source.step is not None:  # pinned: it must exist, and it never changes
            self._serve(*source.load(self._load_device))
            return
        self._load_newest()
        if self.cfg.reload_interval_s > 0:
            threading.Thread(target=self._watch, name="nanochat-checkpoint-watch", daemon=True).start()

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: dict[str, Any]) -> AsyncIterator[list[TokenEvent]]:
        """The request's events in lists, one Ray object per engine step rather than per token."""
        sampling = SamplingParams(**params)
        while True:
            loaded = self.loaded
            if loaded is None:
                raise NoModelLoaded(f"no model loaded yet from {self.source.describe()}")
            events = loaded.engine.generate_batches(request_id, prompt_ids, sampling, self.cfg.stream_interval_s)
            try:
                first = await anext(events)
                break
            except EngineStopped:
                if self._swapping.is_set():  # the old engine drains before the new one starts: wait for it
                    await asyncio.sleep(SWAP_POLL_S)
                elif loaded is self.loaded:  # not replaced: this engine really has stopped
                    raise
                # else replaced between reading self.loaded and submitting: the new engine takes it
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # a cancelled stream aborts the request in its engine now, not at GC

    def model_info(self, known_fingerprint: str | None = None) -> dict[str, Any]:
        """What this replica serves: step (None: nothing yet), created, and the tokenizer's fingerprint, with
        its JSON when it is not the one the caller knows."""
        loaded = self.loaded
        if loaded is None:
            return {"step": None, "refused": self.refused}
        info = {"step": loaded.step, "created": loaded.created, "fingerprint": loaded.fingerprint,
                "max_model_len": loaded.engine.max_model_len}
        if loaded.fingerprint != known_fingerprint:
            info["tokenizer_json"] = loaded.tokenizer_json
        return info

    def stats(self) -> dict[str, Any]:
        loaded = self.loaded
        return loaded.engine.stats() if loaded is not None else {}

    def record_routing_stats(self) -> dict[str, Any]:
        """The engine's numbers (requests, KV blocks free, prefix-cache counters), which Serve collects from
        each replica for its request router every request_routing_stats_period_s."""
        return self.stats()

    def engine_alive(self) -> bool:
        """Whether the served engine takes requests (True while no model is loaded, or while the old engine
        drains for a swap: the replica is fine)."""
        loaded = self.loaded
        return loaded is None or self._swapping.is_set() or loaded.engine.alive()

    def check_health(self) -> None:
        """Raises once the served engine has failed (or stopped): Serve then replaces this replica."""
        loaded = self.loaded
        if loaded is not None and not self._swapping.is_set() and not loaded.engine.alive():
            failure = loaded.engine.failure
            raise RuntimeError(f"the engine has failed: {failure}" if failure else "the engine has stopped")

    def stop(self) -> None:
        """Stop looking for checkpoints and shut the engine down."""
        self._stopping.set()
        if self.loaded is not None:
            self.loaded.engine.shutdown()

    def __del__(self) -> None:
        self.stop()

    # -- loading and swapping models (the watcher thread, and __init__)

    def _serve(self, model: Any, tokenizer: Tokenizer, step: int) -> None:
        """Start an engine on the loaded model and send new requests to it; retire the one it replaces:
        beside the new one, or first when the KV cache is sized from free memory (_drain_for_swap)."""
        cfg = self.cfg
        old = self.loaded
        drained = old is not None and resolve_kv_memory_fraction(cfg.kv_cache_memory_fraction, self.device) > 0
        check_servable(model, tokenizer)  # a checkpoint that cannot be served costs no drain
        try:
            if drained:
                self._drain_for_swap(old, step)
            try:
                engine = self._start_engine(model, tokenizer)
            except Exception:
                if drained:
                    del model
                    self._restart(old, step)
                raise
            del model  # an engine process holds its own copy: this one need not wait out the old engine
            tokenizer_json = tokenizer.to_json()
            fingerprint = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
            self.loaded = Loaded(engine, step, tokenizer_json, fingerprint, now())
            self.refused = None
        finally:
            self._swapping.clear()  # requests waiting for the swap now go to the new engine (or fail)
        self.metrics.set_model_step(step)
        was = f", replacing step {old.step}" if old is not None else ""
        log.info("engine replica serving %s step %d on %s (dtype %s, engine core: %s)%s", self.source.describe(), step,
                 self.device, cfg.dtype, cfg.engine_core, was)
        if old is not None and not drained:
            self._retire(old)

    def _start_engine(self, model: Any, tokenizer: Tokenizer) -> EngineClient:
        """An engine on model with serve's settings, stepping on a thread or in a process of its own."""
        cfg = self.cfg
        settings = dict(num_blocks=cfg.num_blocks, kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
                        block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, dtype=cfg.dtype,
                        kv_cache_dtype=cfg.kv_cache_dtype, enforce_eager=cfg.enforce_eager, attention=cfg.attention,
                        hybrid_kv_cache=cfg.hybrid_kv_cache, compile_decode=cfg.compile_decode,
                        async_scheduling=cfg.async_scheduling, scheduling_policy=cfg.scheduling_policy)
        if cfg.engine_core == "process":
            return ProcessEngine(model, tokenizer, self.device, settings, max_queue=cfg.max_queue,
                                 metrics=self.metrics, threads=max(1, int(cfg.num_cpus)),
                                 stream_interval_s=cfg.stream_interval_s)
        return AsyncEngine(build_engine(model, tokenizer, self.device, **settings), max_queue=cfg.max_queue,
                           metrics=self.metrics)

    def _drain_for_swap(self, old: Loaded, step: int) -> None:
        """Make room for step's engine in the memory of the old one: a KV cache sized as a fraction of the
        free memory leaves none for a second. The old engine lets its requests finish (for up to
        serve.drain_timeout_s; what is left then is aborted) while new ones wait in generate(), then shuts
        down and gives its memory back. Should the new engine then fail to start, _restart serves the old
        step again."""
        self._swapping.set()
        log.info("loading step %d in the memory of step %d's engine: its %d requests finish first, new ones wait",
                 step, old.step, old.engine.unfinished())
        aborted = old.engine.drain(self.cfg.drain_timeout_s)
        self._free_memory()  # the old engine's model and cache go before the new cache is sized
        log.info("engine of step %d shut down for the swap (%d requests aborted at serve.drain_timeout_s)",
                 old.step, aborted)

    def _restart(self, old: Loaded, step: int) -> None:
        """After a drained swap whose new engine failed to start (step's model or cache does not fit where the
        old one did): the old step again, read from storage (its model went with its engine), so the replica
        goes on serving what it served rather than nothing. Should that fail too, the replica is left with a
        stopped engine: its health check fails and Serve replaces it."""
        log.error("step %d's engine cannot start in the memory step %d's left; serving step %d again",
                  step, old.step, old.step)
        self._free_memory()  # what the failed engine allocated
        model, tokenizer, _ = replace(self.source, step=old.step).load(self._load_device)
        self.loaded = replace(old, engine=self._start_engine(model, tokenizer))

    def _free_memory(self) -> None:
        """Give back the memory of engines and models no longer referenced, a GPU's included."""
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _retire(self, old: Loaded) -> None:
        """Shut the replaced engine down once the requests it holds have finished."""
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        while old.engine.unfinished() and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.1)
        old.engine.shutdown()
        log.info("engine of step %d shut down", old.step)

    def _load_newest(self) -> None:
        """Serve the stage's newest valid checkpoint, if there is one yet and this server can serve it."""
        try:
            model, tokenizer, step = self.source.load(self._load_device)
        except FileNotFoundError as e:  # no tokenizer or no checkpoint yet (KeyNotFound is one too)
            log.info("no model to serve yet (%s); looking for one every %gs", e, self.cfg.reload_interval_s)
            return
        except StorageError as e:  # e.g. a bucket not created yet: keep answering, keep looking
            log.warning("cannot read %s yet (%s); looking again every %gs", self.source.describe(), e,
                        self.cfg.reload_interval_s)
            return
        try:
            self._serve(model, tokenizer, step)
        except Exception as e:  # failing the replica would only fail its successor the same way
            self._refuse(step, e)

    def _refuse(self, step: int, error: Exception) -> None:
        """Serve nothing, saying why, until a newer step lands."""
        then = ("this server loads a newer checkpoint when one lands" if self.cfg.reload_interval_s > 0 else
                "restart this server once one that can is there (serve.reload_interval_s is 0: it does not "
                "look again)")
        self.refused = f"step {step} of {self.source.describe()} cannot be served ({error}); {then}"
        self._refused_step = step
        log.error("serving no model: %s", self.refused, exc_info=not isinstance(error, ValueError))

    def _watch(self) -> None:
        """Every reload_interval_s: load the step `latest` names when it is not the one served (or tried)."""
        checkpoints = self.source.checkpoints()
        tried = self.loaded.step if self.loaded is not None else self._refused_step
        while not self._stopping.wait(self.cfg.reload_interval_s):
            try:
                step = checkpoints.latest_step()
            except StorageError as e:
                log.warning("cannot look for a newer checkpoint in %s: %s", self.source.describe(), e)
                continue
            if step is None or step == tried:
                continue
            tried = step
            try:
                if self.loaded is None:
                    self._load_newest()  # the newest valid one, falling back past a damaged `latest`
                else:
                    log.info("checkpoint step %d appeared in %s: loading it", step, self.source.describe())
                    self._serve(*replace(self.source, step=step).load(self._load_device))
            except (CorruptCheckpoint, StorageError) as e:
                if isinstance(e, StorageError) and not isinstance(e, KeyNotFound):
                    tried = None  # storage trouble, not the checkpoint's fault: try it again next time
                log.warning("not loading step %d of %s (%s); still serving %s", step, self.source.describe(), e,
                            self._serving())
            except Exception:
                log.exception("not loading step %d of %s; still serving %s", step, self.source.describe(),
                              self._serving())

    def _serving(self) -> str:
        return f"step {self.loaded.step}" if self.loaded is not None else "no model"


class RemoteEngine:
    """The engine replicas behind a deployment handle, with AsyncEngine's interface."""

    def __init__(self, handle: serve.handle.DeploymentHandle, transport: str):
        """transport: serve.transport ("grpc": Serve's gRPC channels; "ray": actor calls by object reference)."""
        self.plain = handle.options(_by_reference=transport != "grpc")
        self.handle = self.plain.options(stream=True)
        self.healthy = True
        self.checked = float("-inf")

    async def generate_batches(self, request_id: str, prompt_ids: list[int],
                               params: SamplingParams) -> AsyncIterator[list[TokenEvent]]:
        stream = self.handle.generate.remote(request_id, prompt_ids, asdict(params))
        try:
            async for batch in stream:
                yield batch
        except BackPressureError as e:  # Ray Serve's queue bound: the request never reached a replica
            raise QueueFull(str(e)) from e  # (and cancelling it would raise this error again)
        except BaseException:  # a closed client stream (GeneratorExit), a cancellation, an error
            stream.cancel()  # aborts the request in the replica
            raise

    async def alive(self) -> bool:
        """Whether the engine takes requests, asked of a replica (one Serve routes to) at most every REFRESH_S:
        False once its engine has failed or is draining, until Serve has replaced it. Busy replicas (a full
        queue, or no answer within HEALTH_TIMEOUT_S) keep the last answer: overload is not a failure."""
        if time.monotonic() - self.checked < REFRESH_S:
            return self.healthy
        self.checked = time.monotonic()
        try:
            self.healthy = await asyncio.wait_for(self.plain.engine_alive.remote(), HEALTH_TIMEOUT_S)
        except (BackPressureError, TimeoutError):
            pass
        except Exception as e:  # e.g. the replica died while answering: Serve starts another
            log.warning("could not ask an engine replica whether its engine is alive: %s", e)
        return self.healthy


class ReplicaModels:
    """The API's ServedModels under Ray: what the engine replicas serve, asked of one of them at most every
    REFRESH_S in the background. While no model is known a request waits for that answer (a model may have
    just been loaded); once one is, requests never wait on it."""

    def __init__(self, handle: serve.handle.DeploymentHandle, hint: str):
        self.handle = handle
        self.hint = hint
        self.refused: str | None = None
        self.model: ServedModel | None = None
        self.tokenizer: Tokenizer | None = None
        self.fingerprint: str | None = None
        self.checked = float("-inf")
        self.refresh: asyncio.Future | None = None

    async def current(self) -> ServedModel | None:
        if time.monotonic() - self.checked >= REFRESH_S and (self.refresh is None or self.refresh.done()):
            self.checked = time.monotonic()
            self.refresh = asyncio.ensure_future(self._refresh())
        if self.model is None and self.refresh is not None and not self.refresh.done():
            await asyncio.wait({self.refresh}, timeout=30)  # not cancelled with the request: others share it
        return self.model

    async def _refresh(self) -> None:
        try:
            info = await self.handle.model_info.remote(self.fingerprint)
        except Exception as e:  # busy or restarting replicas: keep what we know
            log.warning("could not ask the engine replicas which model they serve: %s", e)
            return
        self.refused = info.get("refused")
        if info["step"] is None:
            self.model = None
            return
        if info["fingerprint"] != self.fingerprint:
            self.tokenizer = await asyncio.to_thread(Tokenizer.from_json, info["tokenizer_json"])
            self.fingerprint = info["fingerprint"]
        if self.model is None or (self.model.step, self.model.created) != (info["step"], info["created"]):
            log.info("the engine replicas serve step %d", info["step"])
            self.model = ServedModel(self.tokenizer, info["step"], info["created"], info["max_model_len"])


@serve.deployment(name="api", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, engine: serve.handle.DeploymentHandle, hint: str, serve_cfg: dict[str, Any],
                 api_keys: list[str] | None):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.engine = RemoteEngine(engine, self.cfg.transport)
        self.models = ReplicaModels(engine, hint)
        self.api_keys = api_keys

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_app

        return create_app(self.engine, self.models, model_name=self.cfg.model_name, api_keys=self.api_keys,
                          max_prompt_tokens=self.cfg.max_prompt_tokens, max_tokens_limit=self.cfg.max_tokens_limit,
                          priority_scheduling=self.cfg.scheduling_policy == "priority",
                          allowed_origins=self.cfg.allowed_origins)


def api_keys_from_env() -> list[str] | None:
    keys = [k.strip() for k in os.environ.get("NANOCHAT_API_KEYS", "").split(",") if k.strip()]
    return keys or None


def build_app(cfg: Config, source: ModelSource) -> serve.Application:
    """The serving application for a model source, sized by the `serve` config section. Storage is not
    read here: the replicas load the model, or wait for one."""
    s = cfg.serve
    routing = {}
    if s.routing == "prefix":
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter, request_router_kwargs={"block_size": s.block_size})
    engine = EngineReplica.options(
        **routing,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        graceful_shutdown_timeout_s=s.drain_timeout_s,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(source, s.model_dump())
    # No queue bound in front of the ingress either (with api_max_ongoing_requests set): Serve counts a
    # burst's requests as queued until each is assigned, and past a bound its proxy answers a plain-text
    # 503, not the API's 429.
    ingress = Ingress.options(max_ongoing_requests=s.ingress_max_ongoing_requests, max_queued_requests=-1,
                              graceful_shutdown_timeout_s=s.drain_timeout_s)
    return ingress.bind(engine, no_model_hint(cfg, source), s.model_dump(), api_keys_from_env())


def no_model_hint(cfg: Config, source: ModelSource) -> str:
    """The 503's explanation until a model is served: where the server looks, how to train one."""
    if cfg.serve.reload_interval_s > 0:
        return f"{source.train_hint()}; this server loads it when it lands, without a restart."
    return f"{source.train_hint()}, then restart this server (serve.reload_interval_s is 0: it does not look again)."


def default_source(cfg: Config, storage_uri: str) -> ModelSource:
    return ModelSource(storage_uri, cfg.run, cfg.serve.stage)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run serving.deployments:app_builder model=URI` / KubeRay's serveConfigV2 import path.

    args: `model` (a checkpoint URI) or `storage` (+ `run`), and any config keys as `set` ("a.b=c,d.e=f")."""
    overrides = [item for item in str(args.get("set", "")).split(",") if item.strip()]
    if "run" in args:
        overrides.append(f"run={args['run']}")
    cfg = load_config(preset=args.get("preset"), overrides=overrides)
    if args.get("model"):
        source = ModelSource.parse(str(args["model"]))
    else:
        from services.settings import default_storage_uri

        source = default_source(cfg, str(args.get("storage") or default_storage_uri()))
    return build_app(cfg, source)
