"""
The engine in a process of its own (serve.engine_core: process), as vLLM runs its EngineCore: the stepping
engine and the replica's asyncio loop, Serve's gRPC threads and the per-token Python of the streams no longer
take turns on one GIL; each gets a core.

Notable:
- the child is `python -m serving.engine.engine_process`. Down its stdin the parent sends the model (its
  config and CPU weights: the parent never puts the model on the GPU), the tokenizer and the engine's
  settings, then commands: ("add", id, prompt, params, arrival), ("abort", id), ("stop",). The child builds
  the LLMEngine on its device (the KV cache sized there from free memory when a fraction is set) and runs
  an EngineCore; up its stdout it answers ("ready", RequestCheck, stats) once (or ("error", why) when it
  cannot build the engine), then ("step", events by request, stats, metric calls) per step, or per several
  steps with serve.stream_interval_s (Outbox), or ("failed", why, metric calls) when a step fails.
- frames are pickles behind an 8-byte length. The child moves its fd 1 to stderr first, so a stray print
  (or a library's) lands in the replica's log instead of corrupting the stream.
- metrics: the child's EngineCore records into a CallLog that writes each call down; the parent makes the
  same calls on its MetricsRecorder, so a replica exports the same series with either engine core.
- the parent's EngineClient does everything else as for a thread (queue bound, validation with the
  child's RequestCheck, draining, streams). A child that dies (killed, out of memory) ends every open
  stream with an error and turns alive() False, as a failed step does, so Serve replaces the replica. A
  child whose parent dies reads the end of its stdin and stops; it ignores SIGINT (a Ctrl-C reaches the
  whole process group), so the replica alone decides when it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from nanochat.checkpoint import model_from_state
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.engine.async_engine import Delivery, EngineClient, EngineCore
from serving.engine.llm_engine import RequestCheck, build_engine

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # building the engine: a large model on a slow disk, CUDA graphs captured
STOP_TIMEOUT_S = 60.0


def send(pipe: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(struct.pack("<Q", len(data)) + data)
    pipe.flush()


def receive(pipe: IO[bytes]) -> Any:
    """The next message; EOFError once the other side has closed the pipe (or ended)."""
    head = pipe.read(8)
    if len(head) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", head)
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class CallLog:
    """Stands in for a MetricsRecorder in the engine process: each call is written down, for the parent to
    make on its own recorder (only the engine thread calls it, and takes the log)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def on_request_start(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("on_request_start", args, kwargs))

    def on_first_token(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("on_first_token", args, kwargs))

    def on_token(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("on_token", args, kwargs))

    def on_finish(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("on_finish", args, kwargs))

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("update", args, kwargs))

    def take(self) -> list[tuple[str, tuple, dict]]:
        calls, self.calls = self.calls, []
        return calls


class Outbox:
    """The child's step deliveries on their way up the pipe, held back for at most `hold_s`
    (serve.stream_interval_s) while nothing is urgent. Then one message, and one wake-up of the parent, goes
    per interval rather than per step, and the parent's streams would hold the tokens that long anyway.
    Sent at once, with everything held: a request's first events (its time to first token), a choice's end
    or an error, and anything when the engine has no work left. Of the held "update" metric calls
    (gauges), only the newest is sent."""

    def __init__(self, send_step: Callable[[Delivery, dict, list], None], hold_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._send_step, self.hold_s, self._clock = send_step, hold_s, clock
        self._held: Delivery = {}
        self._calls: list[tuple[str, tuple, dict]] = []
        self._stats: dict = {}
        self._sent_at = float("-inf")
        self._started: set[str] = set()  # requests whose first events have gone up

    def add(self, by_request: Delivery, stats: dict, calls: list[tuple[str, tuple, dict]], idle: bool) -> None:
        urgent = idle or self._clock() - self._sent_at >= self.hold_s
        for request_id, events in by_request.items():
            self._held.setdefault(request_id, []).extend(events)
            if request_id not in self._started:
                self._started.add(request_id)
                urgent = True
            if any(isinstance(e, BaseException) or e.finish_reason is not None for e in events):
                self._started.discard(request_id)  # (an n > 1 request whose other choices go on: sent at once again)
                urgent = True
        if any(name == "update" for name, _, _ in calls):
            self._calls = [call for call in self._calls if call[0] != "update"]
        self._calls.extend(calls)
        self._stats = stats
        if urgent:
            self.flush()

    def flush(self) -> None:
        held, self._held, calls, self._calls = self._held, {}, self._calls, []
        self._sent_at = self._clock()
        self._send_step(held, self._stats, calls)


class ProcessEngine(EngineClient):
    """An EngineClient whose LLMEngine steps in a child process, which sends its steps' events up through an
    Outbox holding them for up to stream_interval_s. Blocks until the child has built the engine (or raises
    RuntimeError with why it could not)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str, engine_settings: dict[str, Any], *,
                 max_queue: int = 64, metrics: Any = None, threads: int = 1, stream_interval_s: float = 0.0):
        root = str(Path(__file__).resolve().parents[2])  # where `serving` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "serving.engine.engine_process"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        self._write_lock = threading.Lock()
        self.metrics = metrics
        self._running: set[str] = set()  # requests the recorder has seen start and not finish
        spec = {"config": dataclasses.asdict(model.config), "state": {k: v.cpu() for k, v in model.state_dict().items()},
                "tokenizer": tokenizer.to_json(), "device": device, "engine": engine_settings, "threads": threads,
                "stream_interval_s": stream_interval_s}
        try:
            send(self._proc.stdin, spec)
            del spec
            ready = self._await_ready()
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            raise
        check, stats = ready
        super().__init__(check, max_queue)
        self._stats = stats
        self._reader = threading.Thread(target=self._read, name="nanochat-engine-process", daemon=True)
        self._reader.start()

    def _await_ready(self) -> tuple[RequestCheck, dict]:
        answer: list = []
        waiter = threading.Thread(target=lambda: answer.append(self._receive_or_none()), daemon=True)
        waiter.start()
        waiter.join(START_TIMEOUT_S)
        if not answer:
            raise RuntimeError(f"the engine process was not ready within {START_TIMEOUT_S:g}s")
        message = answer[0]
        if message is None:
            raise RuntimeError(f"the engine process exited with code {self._proc.wait()} before it was ready")
        if message[0] != "ready":
            raise RuntimeError(f"the engine process could not build the engine: {message[1]}")
        return message[1], message[2]

    def _receive_or_none(self) -> Any:
        try:
            return receive(self._proc.stdout)
        except EOFError:
            return None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _post(self, command: tuple) -> None:
        with self._write_lock:
            try:
                send(self._proc.stdin, command)
            except (BrokenPipeError, ValueError):  # the child has gone: the reader fails every stream
                pass

    def core_running(self) -> bool:
        return self._proc.poll() is None

    def _stop_core(self) -> None:
        with self._write_lock:
            try:
                send(self._proc.stdin, ("stop",))
                self._proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        self._reader.join(STOP_TIMEOUT_S)  # the streams' "abort" ends, then the end of the pipe
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the engine process did not stop within %gs: killing it", STOP_TIMEOUT_S)
            self._proc.kill()
            self._proc.wait()

    def _read(self) -> None:
        """The child's messages, until its stdout closes; then, unless it was told to stop, the failure."""
        while True:
            try:
                message = receive(self._proc.stdout)
            except (EOFError, OSError):
                break
            if message[0] == "step":
                _, by_request, stats, calls = message
                self._replay(calls)
                self._deliver(by_request, stats)
            elif message[0] == "failed":
                _, why, calls = message
                self._replay(calls)
                self._fail(RuntimeError(why))
                self._finish_running()
        code = self._proc.wait()
        with self._lock:
            told_to_stop = self._stopped
        if not told_to_stop:
            logger.error("the engine process exited with code %s", code)
            self._fail(RuntimeError(f"the engine process exited with code {code}"), what="engine failed")
        self._finish_running()

    def _finish_running(self) -> None:
        """End, in the metrics, the requests the child can no longer finish (it failed or is gone)."""
        if self.metrics is not None:
            for request_id in self._running:
                self.metrics.on_finish(request_id)
        self._running.clear()

    def _replay(self, calls: list[tuple[str, tuple, dict]]) -> None:
        for name, args, kwargs in calls:
            if name == "on_request_start":
                self._running.add(args[0])
            elif name == "on_finish":
                self._running.discard(args[0])
            if self.metrics is not None:
                getattr(self.metrics, name)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- the child


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the replica decides when this process ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="engine process %(process)d: %(levelname)s %(name)s: %(message)s")
    commands = sys.stdin.buffer
    write_lock = threading.Lock()

    def reply(message: Any) -> None:
        with write_lock:
            send(out, message)

    spec = receive(commands)
    try:
        torch.set_num_threads(spec["threads"])
        model = model_from_state(spec["config"], spec.pop("state"), spec["device"])
        engine = build_engine(model, Tokenizer.from_json(spec["tokenizer"]), spec["device"], **spec["engine"])
    except Exception as e:
        logger.exception("building the engine failed")
        reply(("error", f"{type(e).__name__}: {e}"))
        return
    calls = CallLog()

    outbox = Outbox(lambda by_request, stats, step_calls: reply(("step", by_request, stats, step_calls)),
                    spec["stream_interval_s"])

    def deliver(by_request: Delivery, stats: dict) -> None:
        outbox.add(by_request, stats, calls.take(), idle=not engine.has_work())

    def fail(cause: Exception) -> None:
        outbox.flush()
        reply(("failed", f"{type(cause).__name__}: {cause}", calls.take()))

    core = EngineCore(engine, deliver, fail, metrics=calls)
    reply(("ready", engine.check, engine.stats()))
    while True:
        try:
            command = receive(commands)
        except EOFError:  # the parent has gone
            command = ("stop",)
        if command[0] == "stop":
            core.stop()
            return
        core.post(command)


if __name__ == "__main__":
    main()
