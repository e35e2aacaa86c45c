"""
The terminal chat, `nanochat chat`: a conversation with a running server, or, when none answers, with
the newest checkpoint of the served stage (SFT) loaded into this process.

Notable:
- talks to the server as any OpenAI client would: POST /v1/chat/completions with stream=true, each SSE
  delta printed as it arrives. Standard library only (urllib), so the client needs nothing installed.
- "no server" means nothing answers at the URL (refused, unknown host, timeout); a server that answers
  with an error (401, 503 while loading) is reported, not bypassed. The local fallback loads the model
  as `nanochat serve` does (serving/model_source.py) and generates with nanochat/generate.py, calculator
  tool included, printing token by token through an incremental UTF-8 decoder.
- -p PROMPT: one reply on stdout, exit status 0; a failure goes to stderr with status 1. Interactive:
  the conversation grows turn by turn; /clear starts a new one, /quit or end of input (Ctrl-D) leaves,
  Ctrl-C during a reply stops it and keeps what was printed.
- model output is text, never terminal commands: control characters (ANSI escapes included) other than
  newline and tab are dropped before printing.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Protocol, TextIO

DEFAULT_URL = "http://127.0.0.1:8000"
TOP_K = 50  # nanochat's chat default: cuts the long tail a small model samples badly from
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ChatError(Exception):
    """A reply could not be had; the message says why."""


class ServerUnreachable(ChatError):
    """Nothing answers at the URL."""


class Backend(Protocol):
    def stream(self, messages: list[dict], temperature: float, max_tokens: int) -> Iterator[str]: ...


# ---------------------------------------------------------------------------------------------
# the two backends


class RemoteChat:
    """A nanochat (or any OpenAI-compatible) server's /v1/chat/completions, streamed."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.model = model  # None: the server's own
        self.timeout_s = timeout_s

    def check(self) -> None:
        """ServerUnreachable if nothing answers at the URL; any HTTP answer, even an error, is a server."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5):
                pass
        except urllib.error.HTTPError:
            pass
        except OSError as e:  # URLError (refused, unknown host) and timeouts
            raise ServerUnreachable(f"no server at {self.url} ({getattr(e, 'reason', e)})") from None

    def stream(self, messages: list[dict], temperature: float, max_tokens: int) -> Iterator[str]:
        body = {"messages": messages, "stream": True, "temperature": temperature, "max_tokens": max_tokens,
                "top_k": TOP_K}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ChatError(_http_error(e)) from None
        except OSError as e:
            raise ChatError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None
        with response:  # leaving early (Ctrl-C) closes the connection: the server cancels the request
            for data in _sse_data(response):
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(f"the server failed mid-reply: {chunk['error'].get('message')}")
                for choice in chunk.get("choices") or []:  # none in a usage chunk
                    if text := (choice.get("delta") or {}).get("content"):
                        yield text
        raise ChatError("the connection closed before the reply was complete")


class LocalChat:
    """A model in this process, generating with nanochat/generate.py."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_storage(cls, storage_uri: str | None, run: str, stage: str) -> LocalChat:
        import torch

        from services.storage import open_storage
        from serving.model_source import ModelSource

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer, _ = ModelSource(open_storage(storage_uri).uri, run, stage).load(device)
        return cls(model, tokenizer)

    def stream(self, messages: list[dict], temperature: float, max_tokens: int) -> Iterator[str]:
        from nanochat.generate import DONE, generate

        prompt = self.tokenizer.render_for_completion({"messages": messages})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for column, _ in generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                  temperature=temperature, top_k=TOP_K):
            if column[0] == DONE:
                break
            # special tokens (the end of the turn, the tool's delimiters) stand for no text
            if text := decoder.decode(self.tokenizer.id_to_bytes(column[0])):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail


def _http_error(e: urllib.error.HTTPError) -> str:
    """'401: message' from an OpenAI-shaped error body, or the status line."""
    message = e.reason
    try:
        message = json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    hint = " (pass the server's key with --api-key)" if e.code == 401 else ""
    retry = e.headers.get("Retry-After") if e.headers else None
    if retry:
        hint += f" (the server is busy: retry in {retry} s)"
    return f"{e.code}: {message}{hint}"


def _sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """The data of each server-sent event, from the response's lines as they arrive."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


# ---------------------------------------------------------------------------------------------
# the conversation


def connect(url: str, *, api_key: str | None, model: str | None, storage: str | None, run: str, stage: str,
            stderr: TextIO) -> Backend:
    """The server at url if one answers there, else the newest checkpoint of stage, loaded here."""
    remote = RemoteChat(url, api_key, model)
    try:
        remote.check()
        return remote
    except ServerUnreachable as e:
        print(f"{e}: loading the newest {stage} checkpoint of run {run!r} to chat here instead", file=stderr,
              flush=True)
    try:
        return LocalChat.from_storage(storage, run, stage)
    except (FileNotFoundError, ValueError) as e:
        raise ChatError(f"no server at {url} and no local model: {e}") from None


def echo(pieces: Iterable[str], stdout: TextIO, collected: list[str]) -> None:
    """Prints each piece of a reply as it comes, and collects it (kept if the stream breaks off)."""
    for piece in pieces:
        collected.append(piece)
        stdout.write(_CONTROL.sub("", piece))
        stdout.flush()


class ChatSession:
    """An interactive conversation read line by line; messages is the history sent with each turn."""

    PROMPT = "you> "

    def __init__(self, backend: Backend, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, temperature: float,
                 max_tokens: int):
        self.backend = backend
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.temperature, self.max_tokens = temperature, max_tokens
        self.messages: list[dict] = []

    def _read(self) -> str | None:
        """The next line, None at end of input; a terminal gets line editing through input()."""
        if self.stdin is sys.stdin and sys.stdin.isatty():
            import readline  # noqa: F401 - enables editing and history in input()

            try:
                return input(self.PROMPT)
            except EOFError:
                return None
        self.stdout.write(self.PROMPT)
        self.stdout.flush()
        line = self.stdin.readline()
        return line or None

    def run(self) -> int:
        print("nanochat chat: /clear starts a new conversation, /quit or Ctrl-D leaves", file=self.stdout)
        while (line := self._read()) is not None:
            text = line.strip()
            if text in ("/quit", "/exit"):
                return 0
            if text == "/clear":
                self.messages.clear()
                print("(new conversation)", file=self.stdout)
            elif text:
                self._turn(text)
        self.stdout.write("\n")
        return 0

    def _turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self.stdout.write("nanochat> ")
        parts: list[str] = []
        try:
            echo(self.backend.stream(self.messages, self.temperature, self.max_tokens), self.stdout, parts)
        except KeyboardInterrupt:
            self.stdout.write(" [stopped]")
        except ChatError as e:
            self.stdout.write("\n")
            print(f"error: {e}", file=self.stderr, flush=True)
            if not parts:  # nothing to keep: the user may send it again
                self.messages.pop()
                return
        self.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(parts)})


def run_chat(prompt: str | None = None, *, url: str = DEFAULT_URL, api_key: str | None = None,
             model: str | None = None, temperature: float = 0.6, max_tokens: int = 512,
             storage: str | None = None, run: str = "default", stage: str = "sft",
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """`nanochat chat`: one reply to prompt, or an interactive session when prompt is None; the exit status.

    storage, run and stage say which checkpoint to load when no server answers at url. The streams
    default to sys's as they are at the call (a test may have replaced them)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        backend = connect(url, api_key=api_key, model=model, storage=storage, run=run, stage=stage, stderr=stderr)
        if prompt is None:
            return ChatSession(backend, stdin, stdout, stderr, temperature=temperature, max_tokens=max_tokens).run()
        echo(backend.stream([{"role": "user", "content": prompt}], temperature, max_tokens), stdout, [])
        stdout.write("\n")
        return 0
    except ChatError as e:
        print(f"nanochat chat: {e}", file=stderr, flush=True)
        return 1
