"""
The Ray Serve application: an API ingress in front of engine replicas.

Notable:
- `EngineReplica` holds one continuous-batching engine (its own paged KV cache) and streams TokenEvents;
  it autoscales on ongoing requests, and Ray Serve's `max_queued_requests` bounds the queue in front of it
- `Ingress` builds the same FastAPI app the tests run without Ray (`serving/api/app.py`), talking to the
  engine replicas through a handle that looks like an AsyncEngine (`RemoteEngine`); it admits more requests
  than the engines can take or queue (serve.api_max_ongoing_requests), so overload meets their bound and
  gets a 429 with Retry-After, as it does without Ray
- a client that disconnects cancels its stream; the cancellation reaches the replica, whose engine aborts
  the request and frees its blocks
- `app_builder` is the import path for KubeRay's RayService (`serving.app:app_builder`) and `serve run`
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError

from nanochat.config import Config, ServeConfig, load_config
from serving.engine.llm_engine import AsyncEngine, LLMEngine, QueueFull, TokenEvent
from serving.engine.sequence import SamplingParams
from serving.metrics import MetricsRecorder
from serving.model_source import ModelSource

log = logging.getLogger(__name__)


@serve.deployment(name="engine", health_check_period_s=10, graceful_shutdown_timeout_s=30)
class EngineReplica:
    def __init__(self, source: ModelSource, serve_cfg: dict[str, Any]):
        import torch

        cfg = ServeConfig.model_validate(serve_cfg)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        model, tokenizer, step = source.load(device)
        log.info("engine replica serving %s step %d on %s (dtype %s)", source.describe(), step, device, cfg.dtype)
        engine = LLMEngine(model, tokenizer, num_blocks=cfg.num_blocks, block_size=cfg.block_size,
                           max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                           device=device, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager)
        # inside Ray the recorder publishes through Ray's metrics agent (ray_nanochat_* on every replica)
        self.engine = AsyncEngine(engine, max_queue=cfg.max_queue, metrics=MetricsRecorder(cfg.model_name))

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict[str, Any]) -> AsyncIterator[TokenEvent]:
        async for event in self.engine.generate(request_id, prompt_ids, SamplingParams(**params)):
            yield event

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        self.engine.shutdown()


class RemoteEngine:
    """The engine replicas behind a deployment handle, with AsyncEngine's interface."""

    def __init__(self, handle: serve.handle.DeploymentHandle):
        self.handle = handle.options(stream=True)
        self.stats_handle = handle

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        stream = self.handle.generate.remote(request_id, prompt_ids, asdict(params))
        try:
            async for event in stream:
                yield event
        except BackPressureError as e:  # Ray Serve's queue bound: the request never reached a replica
            raise QueueFull(str(e)) from e  # (and cancelling it would raise this error again)
        except BaseException:  # a closed client stream (GeneratorExit), a cancellation, an error
            stream.cancel()  # aborts the request in the replica
            raise

    def alive(self) -> bool:
        return True  # Serve health-checks the engine replicas themselves (EngineReplica.check_health)


@serve.deployment(name="api", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, engine: serve.handle.DeploymentHandle, tokenizer_json: str, serve_cfg: dict[str, Any],
                 api_keys: list[str] | None):
        from nanochat.tokenizer import Tokenizer

        self.engine = RemoteEngine(engine)
        self.tokenizer = Tokenizer.from_json(tokenizer_json)
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.api_keys = api_keys

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_app

        return create_app(self.engine, self.tokenizer, model_name=self.cfg.model_name, api_keys=self.api_keys,
                          max_prompt_tokens=self.cfg.max_prompt_tokens, max_tokens_limit=self.cfg.max_tokens_limit)


def api_keys_from_env() -> list[str] | None:
    keys = [k.strip() for k in os.environ.get("NANOCHAT_API_KEYS", "").split(",") if k.strip()]
    return keys or None


def build_app(cfg: Config, source: ModelSource) -> serve.Application:
    """The serving application for a model source, sized by the `serve` config section."""
    from services.storage import open_storage
    from serving.model_source import TOKENIZER_KEY

    s = cfg.serve
    engine = EngineReplica.options(
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(source, s.model_dump())
    tokenizer_json = open_storage(source.storage).read_text(TOKENIZER_KEY)
    bound = s.ingress_max_ongoing_requests
    ingress = Ingress.options(max_ongoing_requests=bound, max_queued_requests=bound)
    return ingress.bind(engine, tokenizer_json, s.model_dump(), api_keys_from_env())


def default_source(cfg: Config, storage_uri: str) -> ModelSource:
    return ModelSource(storage_uri, cfg.run, cfg.serve.stage)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run serving.app:app_builder model=URI` / KubeRay's serveConfigV2 import path.

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
