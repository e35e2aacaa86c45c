"""
The serving engine's asyncio front: EngineCore steps an LLMEngine on a thread of its own, and EngineClient
serves its events to asyncio servers; AsyncEngine runs the core on a thread of this process, ProcessEngine
(serving/engine/engine_process.py) in a child.

Notable:
- every LLMEngine call happens on the one engine thread (the scheduler and block manager are not thread
  safe), which takes commands (add, abort) from a locked inbox between steps and hands each step's events
  over by request. generate() posts the request and reads the events from an asyncio.Queue fed with
  loop.call_soon_threadsafe; closing or cancelling the iteration (a client that disconnected) posts an
  abort. The queue bound counts requests accepted and not yet finished, including those not yet in the
  engine, so a burst can never overshoot it.
- a failed step (a CUDA error, a bug) ends the engine: every open stream gets the error, the thread stops,
  alive() turns False and new requests get EngineStopped. A server's /health then answers 503 and Ray Serve
  replaces the replica; carrying on would leave a replica that looks healthy while failing every request.
- drain(timeout_s): the graceful end of a server. New requests get EngineStopped (503 with Retry-After)
  and alive() turns False at once, so load balancers stop sending; requests in flight may finish within
  timeout_s, then what is left is aborted (its streams end with "abort") and the thread stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.engine.llm_engine import LLMEngine, RequestCheck, TokenEvent
from serving.engine.sequence import SamplingParams

if TYPE_CHECKING:
    from serving.metrics import MetricsRecorder

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine already holds max_queue unfinished requests: the server should answer 429/503."""


class EngineStopped(RuntimeError):
    """The engine is shut down (or replaced by a newer model's) and takes no new requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int


@dataclass
class _RequestTally:
    """Engine-thread bookkeeping of a request, for metrics and for ending it."""

    n: int
    finished: int = 0
    tokens_seen: bool = False


IDLE_METRICS_REFRESH_S = 5.0
Delivery = dict[str, list]  # request id -> its events of one step (or [an exception])


class EngineCore:
    """LLMEngine stepping on a thread of its own. Commands ("add", id, prompt, params, arrival), ("abort", id)
    are applied between steps; each step's events go to `deliver` by request, with the engine's stats; a
    failed step goes to `fail` and ends the thread. AsyncEngine runs one beside its event loop; an engine
    process (serving/engine/engine_process.py) runs one and sends what it is handed down a pipe."""

    def __init__(self, engine: LLMEngine, deliver: Callable[[Delivery, dict], None],
                 fail: Callable[[Exception], None], metrics: MetricsRecorder | None = None):
        self.engine: LLMEngine | None = engine  # None once stopped and dropped (AsyncEngine.shutdown)
        self.metrics = metrics
        self._deliver = deliver
        self._fail_to = fail
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._stopped = False
        self._tallies: dict[str, _RequestTally] = {}  # engine thread only
        self.thread = threading.Thread(target=self._run, name="nanochat-engine", daemon=True)
        self.thread.start()

    def post(self, command: tuple) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    def stop(self) -> None:
        """Abort what is left (its streams end with "abort"), then end the thread and wait for it."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self.thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a broken step (or a bug): fail every stream rather than hang it, and stop
            logger.exception("engine step failed: the engine stops")
            self._fail(e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._inbox or self.engine.has_work()):
                    # idle: wake now and then to re-set the gauges, as exporters drop stale ones
                    if not self._cond.wait(timeout=IDLE_METRICS_REFRESH_S):
                        break
                commands, self._inbox = self._inbox, []
                stopping = self._stopped
            for command in commands:
                self._apply(command)
            if stopping:
                for request_id in list(self._tallies):
                    self.engine.abort(request_id)
            events = self.engine.step() if self.engine.has_work() else []
            stats = self.engine.stats()
            self._record(events, stats)
            by_request: Delivery = {}
            for event in events:
                by_request.setdefault(event.request_id, []).append(event)
            self._deliver(by_request, stats)
            if stopping and not self.engine.has_work():
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return
        _, request_id, prompt_ids, params, arrival = command
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as e:  # validated already; this is a bug, which only this request pays for
            logger.exception("adding request %s failed", request_id)
            self._deliver({request_id: [e]}, self.engine.stats())
            return
        self._tallies[request_id] = _RequestTally(params.n)
        if self.metrics is not None:
            self.metrics.on_request_start(request_id, len(prompt_ids), now=arrival)

    def _fail(self, cause: Exception) -> None:
        """Hand the failure over (every accepted request ends with it), drop the inbox and free every block."""
        with self._cond:
            self._stopped = True
            self._inbox = []
        self._fail_to(cause)
        for request_id in list(self._tallies):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is broken already: its blocks go with it
                logger.exception("aborting %s after the failure", request_id)
            if self.metrics is not None:
                self.metrics.on_finish(request_id)
        self._tallies.clear()
        self.engine.pending.clear()  # their streams have already ended with the error

    def _record(self, events: list[TokenEvent], stats: dict) -> None:
        """Per-request progress (and metrics) from a step's events."""
        now = time.monotonic()
        tokens: dict[str, int] = {}
        for event in events:
            if event.token_id is not None:
                tokens[event.request_id] = tokens.get(event.request_id, 0) + 1
        for request_id, count in tokens.items():
            tally = self._tallies[request_id]
            if self.metrics is not None:
                if tally.tokens_seen:
                    self.metrics.on_token(request_id, count, now=now)
                else:
                    self.metrics.on_first_token(request_id, count, now=now)
            tally.tokens_seen = True
        for event in events:
            if event.finish_reason is None:
                continue
            tally = self._tallies[event.request_id]
            tally.finished += 1
            if tally.finished == tally.n:
                del self._tallies[event.request_id]
                if self.metrics is not None:
                    self.metrics.on_finish(event.request_id, now=now)
        if self.metrics is not None:
            self.metrics.update(stats)


class EngineClient:
    """The asyncio side of an engine: requests go in as commands, each request's events come back to an
    asyncio.Queue of its own. The queue bound, draining and the end of every stream on a failure live here;
    where the engine steps is the subclass's: a thread (AsyncEngine) or a process (ProcessEngine)."""

    def __init__(self, check: RequestCheck, max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.check = check
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}  # accepted and not finished: what the queue bound counts
        self._stopped = False
        self._draining = False
        self.failure: Exception | None = None  # what ended the engine, if it failed
        self._stats: dict = {}

    # -- what a subclass provides

    def _post(self, command: tuple) -> None:
        """Hand ("add", ...) or ("abort", id) to the engine."""
        raise NotImplementedError

    def core_running(self) -> bool:
        """Whether the engine's thread (or process) still runs."""
        raise NotImplementedError

    def _stop_core(self) -> None:
        """Abort what is left, stop the engine and wait for it."""
        raise NotImplementedError

    # -- the asyncio side

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Stream the request's events until every choice has ended. Before the first event: ValueError
        for a request that cannot run, QueueFull when max_queue requests are unfinished. Closing or
        cancelling the iteration aborts the request and frees its blocks."""
        batches = self.generate_batches(request_id, prompt_ids, params)
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()

    async def generate_batches(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                               interval_s: float = 0.0) -> AsyncIterator[list[TokenEvent]]:
        """generate(), as lists of the events that have arrived by the time the consumer asks (one step's,
        or more when it fell behind): a Ray Serve replica sends one object per list, not per token.
        interval_s: after the first list (so the time to first token is not delayed), at least this long
        between lists, each holding every event of the steps in between: fewer, larger messages through
        every hop to the client, for some burstiness in the stream. The list that ends the request (or
        carries an error) goes at once: holding back its last tokens would only delay the reply's end."""
        self.check.validate(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._lock:
            if self.failure is not None:
                raise EngineStopped(f"the engine has failed: {self.failure}")
            if self._stopped or self._draining:
                raise EngineStopped("the engine is shut down or draining: it takes no new requests")
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r} is already running")
            if len(self._streams) >= self.max_queue:
                raise QueueFull(f"{len(self._streams)} requests are already queued or running (max_queue "
                                f"{self.max_queue})")
            self._streams[request_id] = stream
            self._post(("add", request_id, list(prompt_ids), params, time.monotonic()))
        finished = 0
        sent_at = None
        try:
            while finished < params.n:
                deadline = sent_at + interval_s if sent_at is not None else 0.0
                batch = []
                item = await stream.queue.get()
                while True:  # this item, then what has come meanwhile or comes before the deadline
                    if isinstance(item, BaseException):
                        raise item
                    finished += item.finish_reason is not None
                    batch.append(item)
                    if finished == params.n:
                        break
                    if not stream.queue.empty():
                        item = stream.queue.get_nowait()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(stream.queue.get(), left)
                    except TimeoutError:
                        break
                sent_at = time.monotonic()
                yield batch
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                if finished < params.n and not self._stopped:  # client gone (or a failure): free its blocks
                    self._post(("abort", request_id))

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt and completion) the engine runs."""
        return self.check.max_model_len

    def alive(self) -> bool:
        """Whether the engine takes requests: it runs, no step has failed and it is not draining (a server's
        /health, a replica's health check)."""
        return self.core_running() and self.failure is None and not self._draining

    def unfinished(self) -> int:
        """Requests accepted and not yet finished (or abandoned by their consumer)."""
        with self._lock:
            return len(self._streams)

    def stats(self) -> dict:
        """LLMEngine.stats() as of the last step (safe from any thread)."""
        return dict(self._stats)

    def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let those in flight finish for up to timeout_s, then shut down; how many
        were still unfinished (and aborted). Blocks: call it from a thread, not the event loop."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.unfinished() and time.monotonic() < deadline and self.core_running():
            time.sleep(0.02)
        left = self.unfinished()
        if left:
            logger.warning("drain: %d requests still running after %gs are aborted", left, timeout_s)
        self.shutdown()
        return left

    def shutdown(self) -> None:
        """Abort what is left (its streams end with "abort"), stop the engine and wait for it."""
        with self._lock:
            self._stopped = True
        self._stop_core()

    # -- from the engine (any thread)

    def _deliver(self, by_request: Delivery, stats: dict) -> None:
        """A step's events (or a request's error) to their streams."""
        self._stats = stats
        with self._lock:
            targets = [(request_id, self._streams.get(request_id), items) for request_id, items in by_request.items()]
        for request_id, stream, items in targets:
            if stream is None:  # its consumer has gone; the abort it posted is on its way
                continue
            try:
                stream.loop.call_soon_threadsafe(_put_all, stream.queue, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read or abort
                with self._lock:
                    self._streams.pop(request_id, None)
                    if not self._stopped:
                        self._post(("abort", request_id))

    def _fail(self, cause: Exception, what: str = "engine step failed") -> None:
        """The engine failed: every accepted request ends with the error (`what`: cause), and no new one is
        taken."""
        error = RuntimeError(f"{what}: {cause}")
        with self._lock:
            self.failure = cause
            self._stopped = True
            request_ids = list(self._streams)
        self._deliver({request_id: [error] for request_id in request_ids}, self._stats)


class AsyncEngine(EngineClient):
    """LLMEngine on a background thread of this process; generate() streams a request's TokenEvents to
    asyncio."""

    def __init__(self, engine: LLMEngine, max_queue: int = 64, *, metrics: MetricsRecorder | None = None):
        super().__init__(engine.check, max_queue)
        self.engine: LLMEngine | None = engine  # None once shut down
        self._stats = engine.stats()
        self._core = EngineCore(engine, self._deliver, self._fail, metrics)

    def _post(self, command: tuple) -> None:
        self._core.post(command)

    def core_running(self) -> bool:
        return self._core.thread.is_alive()

    def _stop_core(self) -> None:
        self._core.stop()
        # what stepped holds the model and the KV cache: dropped, their memory can go to the engine after
        self._core.engine = self.engine = None


def _put_all(queue: asyncio.Queue, items: list) -> None:
    for item in items:
        queue.put_nowait(item)
