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
- a calculator call prints in place as "[calculator: 12*3 = 36]" (the call, then the output the tool
  gave); the conversation keeps the reply's parts (text, call, output) and sends them back as the
  server's content_parts, so the next turn renders them as the model wrote them.
- --logprobs asks the server for each token's log-probability and prints the reply's tokens with theirs
  after it (a local model gives none: the flag then says so).
"""

from __future__ import annotations

import codecs
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TextIO

DEFAULT_URL = "http://127.0.0.1:8000"
TOP_K = 50  # nanochat's chat default: cuts the long tail a small model samples badly from
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ChatError(Exception):
    """A reply could not be had; the message says why."""


class ServerUnreachable(ChatError):
    """Nothing answers at the URL."""


@dataclass
class Piece:
    """A piece of a reply as it streams: text of the reply's text, or of a calculator part (type "python"
    for the call, "python_output" for its output; index: the part's place in the reply, as the server's
    content_parts number them), and the log-probabilities of the tokens that came with it."""

    text: str
    type: str = "text"
    index: int | None = None
    logprobs: list[dict] = field(default_factory=list)  # OpenAI's logprobs.content entries


class Backend(Protocol):
    def stream(self, messages: list[dict], temperature: float, max_tokens: int,
               logprobs: bool = False) -> Iterator[Piece]: ...


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

    def stream(self, messages: list[dict], temperature: float, max_tokens: int,
               logprobs: bool = False) -> Iterator[Piece]:
        body = {"messages": messages, "stream": True, "temperature": temperature, "max_tokens": max_tokens,
                "top_k": TOP_K}
        if logprobs:
            body["logprobs"] = True
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
                    yield from _pieces(choice)
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

    def stream(self, messages: list[dict], temperature: float, max_tokens: int,
               logprobs: bool = False) -> Iterator[Piece]:
        from nanochat.generate import DONE, generate
        from serving.api.parts import PartSplitter

        prompt = self.tokenizer.render_for_completion({"messages": messages})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        splitter = PartSplitter(self.tokenizer)  # cuts the reply at the tool's delimiters, as the server does
        delimiters = splitter.opens.keys() | splitter.closes.keys()
        for column, _ in generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                  temperature=temperature, top_k=TOP_K):
            token = column[0]
            if token == DONE:
                break
            # special tokens (the end of the turn, the tool's delimiters) stand for no text
            text = decoder.decode(self.tokenizer.id_to_bytes(token), final=token in delimiters)
            for piece in splitter.add(token, text):
                if piece.text or piece.type != "text":
                    yield Piece(piece.text, piece.type, None if piece.type == "text" else piece.index)
        if tail := decoder.decode(b"", final=True):
            yield Piece(tail)


def _pieces(choice: dict) -> Iterator[Piece]:
    """The pieces of one streamed choice: its text, its calculator parts, the token log-probabilities."""
    delta = choice.get("delta") or {}
    logprobs = (choice.get("logprobs") or {}).get("content") or []
    pieces = [Piece(delta["content"])] if delta.get("content") else []
    pieces += [Piece(p["text"], p["type"], p["index"]) for p in delta.get("content_parts") or []]
    if logprobs and not pieces:
        pieces = [Piece("")]
    if pieces:
        pieces[-1].logprobs = logprobs
    yield from pieces


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


class Reply:
    """A reply as it arrives: its parts (the server's content_parts rule: text extends the last part if it
    is text, else starts one; a calculator piece goes to the part its index names) and token logprobs."""

    def __init__(self) -> None:
        self.parts: list[dict] = []
        self.logprobs: list[dict] = []

    def add(self, piece: Piece) -> str:
        """Records piece; what to print for it: its text, with the calculator block's brackets."""
        self.logprobs += piece.logprobs
        last = self.parts[-1] if self.parts else None
        shown = ""
        if piece.type == "text":
            if not piece.text:
                return ""
            if last is None or last["type"] != "text":
                if last is not None:
                    shown = "] "  # the calculator block before it ends
                self.parts.append({"type": "text", "text": ""})
        elif piece.index is None or piece.index >= len(self.parts):
            if piece.type == "python":
                shown = ("] " if last is not None and last["type"] != "text" else "") + "[calculator: "
            else:
                shown = " = " if last is not None and last["type"] == "python" else "[calculator output: "
            self.parts.append({"type": piece.type, "text": ""})
        part = self.parts[-1] if piece.index is None else self.parts[piece.index]
        part["text"] += piece.text
        return shown + piece.text

    def closing(self) -> str:
        """What ends the printed reply: the bracket of a calculator block it ended in."""
        return "]" if self.parts and self.parts[-1]["type"] != "text" else ""

    def message(self) -> dict:
        """The reply as the next turn sends it back: its text, and its parts when it called the calculator."""
        text = "".join(p["text"] for p in self.parts if p["type"] == "text")
        if all(p["type"] == "text" for p in self.parts):
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": text, "content_parts": self.parts}

    def logprobs_line(self) -> str:
        """Every token of the reply with its log-probability, as one line (repr: whitespace and controls show)."""
        return "logprobs: " + "  ".join(f"{e['token']!r} {e['logprob']:.3f}" for e in self.logprobs)


def echo(pieces: Iterable[Piece], stdout: TextIO, reply: Reply) -> None:
    """Prints each piece of a reply as it comes, and records it in reply (kept if the stream breaks off)."""
    for piece in pieces:
        stdout.write(_CONTROL.sub("", reply.add(piece)))
        stdout.flush()
    stdout.write(reply.closing())


class ChatSession:
    """An interactive conversation read line by line; messages is the history sent with each turn."""

    PROMPT = "you> "

    def __init__(self, backend: Backend, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, temperature: float,
                 max_tokens: int, logprobs: bool = False):
        self.backend = backend
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.temperature, self.max_tokens, self.logprobs = temperature, max_tokens, logprobs
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
        reply = Reply()
        try:
            echo(self.backend.stream(self.messages, self.temperature, self.max_tokens, self.logprobs), self.stdout,
                 reply)
        except KeyboardInterrupt:
            self.stdout.write(" [stopped]")
        except ChatError as e:
            self.stdout.write("\n")
            print(f"error: {e}", file=self.stderr, flush=True)
            if not reply.parts:  # nothing to keep: the user may send it again
                self.messages.pop()
                return
        self.stdout.write("\n")
        if self.logprobs and reply.logprobs:
            print(reply.logprobs_line(), file=self.stdout)
        self.messages.append(reply.message())


def run_chat(prompt: str | None = None, *, url: str = DEFAULT_URL, api_key: str | None = None,
             model: str | None = None, temperature: float = 0.6, max_tokens: int = 512, logprobs: bool = False,
             storage: str | None = None, run: str = "default", stage: str = "sft",
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """`nanochat chat`: one reply to prompt, or an interactive session when prompt is None; the exit status.

    logprobs: print each reply's tokens with their log-probabilities after it (a server's only).
    storage, run and stage say which checkpoint to load when no server answers at url. The streams
    default to sys's as they are at the call (a test may have replaced them)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        backend = connect(url, api_key=api_key, model=model, storage=storage, run=run, stage=stage, stderr=stderr)
        if logprobs and isinstance(backend, LocalChat):
            print("nanochat chat: --logprobs needs a server; the local model's replies come without them",
                  file=stderr, flush=True)
        if prompt is None:
            return ChatSession(backend, stdin, stdout, stderr, temperature=temperature, max_tokens=max_tokens,
                               logprobs=logprobs).run()
        reply = Reply()
        echo(backend.stream([{"role": "user", "content": prompt}], temperature, max_tokens, logprobs), stdout, reply)
        stdout.write("\n")
        if logprobs and reply.logprobs:
            print(reply.logprobs_line(), file=stdout)
        return 0
    except ChatError as e:
        print(f"nanochat chat: {e}", file=stderr, flush=True)
        return 1
