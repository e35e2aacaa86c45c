"""`nanochat serve` as the system tests start it: a subprocess on free ports over a storage folder, its
output in a log file beside the folder, stopped with SIGTERM (as Kubernetes stops a pod) when done."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.network import free_port
from tests.support.processes import stop_process, wait_until_answers

NANOCHAT = str(Path(sys.executable).parent / "nanochat")


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    root: Path  # the storage folder it serves from
    port: int
    metrics_port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@contextmanager
def nanochat_serve(root: Path, *settings: str, env: dict[str, str] | None = None, ready_line: str | None = None,
                   timeout_s: float = 150) -> Iterator[ServeProcess]:
    """`nanochat serve --set S ...` for each of settings, serving root (NANOCHAT_STORAGE), with no API keys
    and env on top of this process's environment. Ready once /health answers, or with ready_line once the log
    holds that line (a server with no model yet). Stopped, and its Ray with it, when the block ends."""
    port, metrics_port, log_path = free_port(), free_port(), root.parent / "serve.log"
    command = [NANOCHAT, "serve", "--port", str(port), "--metrics-port", str(metrics_port)]
    command += [arg for setting in settings for arg in ("--set", setting)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "NANOCHAT_STORAGE": str(root), "NANOCHAT_API_KEYS": "",
                                     **(env or {})})
    server = ServeProcess(proc, root, port, metrics_port, log_path)
    try:
        if ready_line is None:
            wait_until_answers(server.base + "/health", proc, log_path, "nanochat serve", timeout_s=timeout_s)
        else:
            _wait_for_line(server, ready_line, timeout_s)
        yield server
    finally:
        stop_process(proc, timeout=60)


def _wait_for_line(server: ServeProcess, line: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while line.encode() not in server.log.read_bytes():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nanochat serve did not print {line!r} within {timeout_s} s "
                               f"(exit code {server.proc.poll()}):\n{server.log.read_text()[-3000:]}")
        time.sleep(0.1)


def assert_streamed_chat_equals_the_unstreamed_reply(client: Any) -> None:
    """Through an `openai.OpenAI` client: a greedy chat reply streamed (with usage) is the reply given whole."""
    messages = [{"role": "user", "content": "How are you?"}]
    whole = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
