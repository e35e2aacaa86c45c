"""The terminal chat (serving/chat_cli.py): against the real server of tests/system/chat_server.py, one shot
and interactive, and, with no server, against the newest checkpoint in storage; calculator calls (from a model
that makes one) and token log-probabilities."""

import io
import tempfile
import time

import pytest

from cli.main import main as cli_main
from nanochat.checkpoint import write_checkpoint
from nanochat.config import Config
from nanochat.gpt import GPT
from services.layout import TOKENIZER_KEY
from services.network import free_port
from serving.chat_cli import ChatSession, LocalChat, Piece, RemoteChat, Reply, echo, run_chat
from tests.support.checkpoints import upload_checkpoint
from tests.system.chat_server import (
    REPLY,
    TOOL_CORPUS,
    TOOL_PARTS,
    TOOL_TEXT,
    PacedGPT,
    reply_model,
    reply_tokenizer,
    serve,
    tool_reply_model,
)


class Terminal(io.StringIO):
    """Standard output that remembers when each write came."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def write(self, text: str) -> int:
        self.times.append(time.monotonic())
        return super().write(text)


class Recording:
    """A backend that passes everything through and remembers the history each turn sent."""

    def __init__(self, backend):
        self.backend = backend
        self.sent: list[list[dict]] = []

    def stream(self, messages, temperature, max_tokens, logprobs=False):
        self.sent.append([dict(m) for m in messages])
        yield from self.backend.stream(messages, temperature, max_tokens, logprobs)


@pytest.fixture(scope="module")
def tok():
    return reply_tokenizer()


@pytest.fixture(scope="module")
def url(tok):
    model = reply_model(tok, PacedGPT)
    model.delay_s = 0.02  # ~20 steps: a reply takes ~0.4 s, so streaming shows
    with serve(model, tok) as (url, _):
        yield url


def unused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_one_shot_prints_the_reply_as_it_streams(url):
    out = Terminal()
    assert run_chat("hi", url=url, temperature=0.0, stdout=out) == 0
    assert out.getvalue() == REPLY + "\n"
    assert len(out.times) >= 10, "one write per streamed piece"
    assert out.times[-1] - out.times[0] > 0.1, "the first piece should print long before the last"


def test_the_command_takes_a_prompt_and_a_url(url, capsys):
    assert cli_main(["chat", "--url", url, "-p", "hi", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == REPLY + "\n"


def test_an_interactive_session_sends_the_growing_conversation(url):
    backend = Recording(RemoteChat(url))
    out = Terminal()
    session = ChatSession(backend, io.StringIO("hello\n\nand then?\n"), out, io.StringIO(), temperature=0.0,
                          max_tokens=64)
    assert session.run() == 0  # at the end of input
    assert backend.sent == [
        [{"role": "user", "content": "hello"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": REPLY},
         {"role": "user", "content": "and then?"}],
    ]
    assert out.getvalue().count(REPLY) == 2


def test_clear_starts_a_new_conversation_and_quit_leaves(url):
    out = Terminal()
    stdin = io.StringIO("hello\n/clear\nagain\n/quit\nnever read\n")
    assert run_chat(url=url, temperature=0.0, stdin=stdin, stdout=out) == 0
    assert "(new conversation)" in out.getvalue()
    assert out.getvalue().count(REPLY) == 2
    assert stdin.readline() == "never read\n"


def test_a_refused_request_is_reported_with_exit_status_1(tok):
    with serve(reply_model(tok), tok, api_keys=["sesame"]) as (url, _):
        out, err = Terminal(), io.StringIO()
        assert run_chat("hi", url=url, stdout=out, stderr=err) == 1
        assert "401" in err.getvalue() and "--api-key" in err.getvalue()
        out = Terminal()
        assert run_chat("hi", url=url, api_key="sesame", temperature=0.0, stdout=out) == 0
        assert out.getvalue() == REPLY + "\n"


def publish(storage, run: str, step: int, model: GPT) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model_state=model.state_dict(), optimizer_state=None, cursor=None,
                         config=Config().model_dump(), rng=None,
                         meta={"stage": "sft", "world_size": 1, "model_config": vars(model.config)})
        upload_checkpoint(storage, run, "sft", step, tmp)


def test_without_a_server_the_newest_sft_checkpoint_answers(tok, local_storage):
    local_storage.write_text(TOKENIZER_KEY, tok.to_json())
    older = reply_model(tok)
    older.init_weights()  # an untrained model: anything but REPLY
    publish(local_storage, "cli", 1, older)
    publish(local_storage, "cli", 2, reply_model(tok))
    out, err = Terminal(), io.StringIO()
    assert run_chat("hi", url=unused_url(), storage=str(local_storage.root), run="cli", temperature=0.0,
                    stdout=out, stderr=err) == 0
    assert out.getvalue() == REPLY + "\n"
    assert "no server at" in err.getvalue() and "sft checkpoint" in err.getvalue()


def test_without_a_server_or_a_checkpoint_it_says_so(local_storage):
    err = io.StringIO()
    assert run_chat("hi", url=unused_url(), storage=str(local_storage.root), stdout=Terminal(), stderr=err) == 1
    assert "no server at" in err.getvalue() and "no local model" in err.getvalue()


def test_control_characters_in_a_reply_never_reach_the_terminal():
    out, reply = Terminal(), Reply()
    echo([Piece("red \x1b[31malert\x07"), Piece("\tdone\n"), Piece("\x9b2J", "python", 1)], out, reply)
    assert out.getvalue() == "red [31malert\tdone\n[calculator: 2J]"
    assert reply.parts == [{"type": "text", "text": "red \x1b[31malert\x07\tdone\n"},  # the conversation keeps it
                           {"type": "python", "text": "\x9b2J"}]


# ---------------------------------------------------------------------------------------------
# the calculator and log-probabilities

TOOL_SHOWN = "Twelve apples cost [calculator: 12*3 = 36] 36 dollars."


@pytest.fixture(scope="module")
def tool_tok():
    return reply_tokenizer((REPLY, TOOL_CORPUS))


@pytest.fixture(scope="module")
def tool_url(tool_tok):
    with serve(tool_reply_model(tool_tok), tool_tok) as (url, _):
        yield url


def test_a_calculator_call_prints_in_place_and_goes_back_with_its_parts(tool_url):
    backend = Recording(RemoteChat(tool_url))
    out = Terminal()
    session = ChatSession(backend, io.StringIO("twelve apples?\nand thirteen?\n"), out, io.StringIO(),
                          temperature=0.0, max_tokens=64)
    assert session.run() == 0
    assert out.getvalue().count("nanochat> " + TOOL_SHOWN + "\n") == 2
    assert backend.sent[1][1] == {"role": "assistant", "content": TOOL_TEXT, "content_parts": TOOL_PARTS}


def test_logprobs_prints_each_token_with_its_log_probability(tool_url, capsys):
    assert cli_main(["chat", "--url", tool_url, "-p", "hi", "--temperature", "0", "--logprobs"]) == 0
    shown, line, rest = capsys.readouterr().out.split("\n")
    assert shown == TOOL_SHOWN and rest == ""
    entries = line.removeprefix("logprobs: ").split("  ")
    assert line.startswith("logprobs: 'Twelve' -") and "'<|python_start|>' -" in line
    assert len(entries) == 15  # every token of the reply but the stop token
    assert all(float(entry.rsplit(" ", 1)[1]) <= 0 for entry in entries)


def test_the_local_model_shows_its_calculator_calls_too(tool_tok, local_storage):
    local_storage.write_text(TOKENIZER_KEY, tool_tok.to_json())
    publish(local_storage, "tools", 1, tool_reply_model(tool_tok))
    out, err = Terminal(), io.StringIO()
    assert run_chat("hi", url=unused_url(), storage=str(local_storage.root), run="tools", temperature=0.0,
                    logprobs=True, stdout=out, stderr=err) == 0
    assert out.getvalue() == TOOL_SHOWN + "\n"
    assert "--logprobs needs a server" in err.getvalue()
    reply = Reply()
    echo(LocalChat(tool_reply_model(tool_tok), tool_tok).stream([{"role": "user", "content": "hi"}], 0.0, 64),
         Terminal(), reply)
    assert reply.message() == {"role": "assistant", "content": TOOL_TEXT, "content_parts": TOOL_PARTS}
