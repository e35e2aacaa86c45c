"""
A chat reply cut into its content parts: the model's text, the calculator calls it wrote and the outputs
the server ran and fed back, in order, in the shape nanochat/tokenizer.py renders a conversation from.

Notable:
- the API returns them in `content_parts`, an extension field of the message (and, streamed, of the
  delta), not as OpenAI's `tool_calls`. OpenAI's tool_calls ask the client to run a function and send its
  result back in a `role: "tool"` message before the model goes on; here the server has already run the
  calculator and the model has gone on within the same turn, so a client that acts on tool_calls (agent
  loops do, whenever the list is not empty) would try to run a "python" function it does not have. And
  one message's tool_calls cannot hold the outputs nor say where the calls stood in the text. Servers that
  return structure a client must not act on use their own field (vLLM's and DeepSeek's
  `reasoning_content`); server-run tools are items of their own in OpenAI's Responses API and Anthropic's
  Messages API. `content_parts` appears only when the reply called the tool, so a plain reply is exactly
  OpenAI's shape.
- `content` keeps the text parts only: the model states the result in its own words after a call (as the
  training data does: "48/2 = <call 48/2, output 24>24 clips"), so the text reads whole without the call.
- the cut is made on the tool's delimiter tokens, which carry no text: <|python_start|> opens a "python"
  part, <|output_start|> a "python_output" part, <|python_end|> and <|output_end|> close them, and text
  after a closed part opens a "text" part. The engine sends the text before a delimiter with the
  delimiter's event (llm_engine.py), so each piece of text lands in the part it was written in.
- sent back in a later turn, the parts render to the very tokens the model generated (delimiters
  included), as in training, so the prompt of the next turn extends the last one and hits the prefix cache.
- streamed, a text piece is a `content` delta as usual; a tool piece is a delta
  {"content_parts": [{"index": i, "type": ..., "text": ...}]}, where i is the part's place in the whole
  message's content_parts (text parts counted). A part's first delta comes with its delimiter, with no
  text yet. A client rebuilds the parts by appending a tool piece to part i, and a content delta to the
  last part if it is a text part, else to a new text part. docs/tool-turns.md shows the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nanochat.tokenizer import Tokenizer

PartType = Literal["text", "python", "python_output"]
TOOL_PARTS = ("python", "python_output")


@dataclass
class Piece:
    """Text added to part `index` of a reply ("" when a token only opens or closes it, or adds no text yet)."""

    index: int
    type: PartType
    text: str


class PartSplitter:
    """One choice's parts, built from its token events as they come."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.encode_special
        self.opens: dict[int, PartType] = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "python_output"}
        self.closes: dict[int, PartType] = {sp("<|python_end|>"): "python", sp("<|output_end|>"): "python_output"}
        self.parts: list[dict] = []  # {"type": PartType, "text": str}, as the tokenizer's conversations hold them
        self.open = False  # whether the last part still takes text (a tool part is closed by its end token)

    def add(self, token: int | None, text: str) -> list[Piece]:
        """The pieces one event adds: its text to the part it belongs to, then the part its token opens
        or closes. A token that adds no text and is no delimiter gives an empty piece of the current part."""
        pieces: list[Piece] = []
        if text:
            if not self.open:
                self._start("text")
            self.parts[-1]["text"] += text
            pieces.append(self._piece(text))
        if token in self.opens:
            self._start(self.opens[token])
            pieces.append(self._piece(""))
        elif token in self.closes and self.open and self.parts[-1]["type"] == self.closes[token]:
            self.open = False
            if not pieces:
                pieces.append(self._piece(""))
        elif not pieces:
            pieces.append(self._piece("") if self.open else Piece(len(self.parts), "text", ""))
        return pieces

    def begin_with(self, parts: list[dict]) -> list[Piece]:
        """Start the reply with parts already written (the message a continued reply echoes); their pieces.
        A text part stays open, so the reply's first text goes on with it."""
        pieces: list[Piece] = []
        for part in parts:
            if part["type"] == "text":
                pieces += self.add(None, part["text"]) if part["text"] else []
                continue
            self._start(part["type"])
            self.parts[-1]["text"] = part["text"]
            self.open = False  # a written tool part is complete: its end token came with it
            pieces.append(self._piece(part["text"]))
        return pieces

    @property
    def content(self) -> str:
        """The text parts alone: what the message's `content` says."""
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    @property
    def has_tool_parts(self) -> bool:
        return any(p["type"] in TOOL_PARTS for p in self.parts)

    def _start(self, kind: PartType) -> None:
        self.parts.append({"type": kind, "text": ""})
        self.open = True

    def _piece(self, text: str) -> Piece:
        return Piece(len(self.parts) - 1, self.parts[-1]["type"], text)
