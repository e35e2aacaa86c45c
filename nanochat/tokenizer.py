"""
BPE tokenizer in the style of GPT-4, trained by HuggingFace `tokenizers` (Rust), encoding with tiktoken.

Notable:
- GPT-4's split regex, except that digits group by 1-2 instead of 1-3 (nanochat's choice: fewer
  vocabulary slots spent on numbers at small vocab sizes).
- Byte-level: the 256 byte symbols are the base alphabet, so every str round-trips exactly,
  decode(encode(s)) == s, and there is no unknown token.
- Special tokens take the last ids, after the BPE vocabulary (the tiktoken layout). Each one encodes
  to a single id, and plain text never produces one: "<|bos|>" typed by a user is encoded as
  ordinary bytes. HF matches added tokens inside text by default; `encode_special_tokens = True`
  turns that off, and since tokenizer.json does not store the flag we set it on every construction.
- Encoding runs in tiktoken, converted from the tokenizer.json (nanochat/tiktoken_bpe.py): the same
  ids, more text per core than HF (bench/data_path.py measures both). A tokenizer.json that tiktoken
  cannot reproduce exactly (none this class trains) is encoded by HF, with a warning giving the reason.
  A list given to encode() is encoded in parallel threads either way.
- Chat rendering: a conversation becomes ids plus a mask of the tokens the assistant is trained on.
- id_to_bytes() gives a token's exact bytes (for bits-per-byte), which decode() of one id cannot when
  a token ends inside a UTF-8 character.
- Learns the same merges as nanochat's rustbpe (same vocabulary, same segmentation, ids numbered
  differently), in more CPU time: HF's per-piece pre-tokenizer bookkeeping dominates, and no trainer
  setting removes it (bench/tokenizer.py compares the two).
- Serialisation is the plain tokenizer.json text; storage I/O belongs to the callers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import tiktoken
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from nanochat.tiktoken_bpe import NotExpressible, tiktoken_encoding

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    # every document begins with BOS, which also delimits documents in a packed sequence
    "<|bos|>",
    # the rest only appear in rendered conversations (midtraining, SFT, RL, chat)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's pattern with \p{N}{1,2} in place of \p{N}{1,3}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level alphabet: printable char standing for a byte -> that byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _tiktoken_or_none(hf: HFTokenizer) -> tiktoken.Encoding | None:
    """The tiktoken twin of `hf`, or None (with the reason logged) where it cannot give the same ids."""
    try:
        return tiktoken_encoding(json.loads(hf.to_str()), SPLIT_PATTERN, _byte_decoder(),
                                 lambda token: [t.id for t in hf.model.tokenize(token)])
    except NotExpressible as e:
        log.warning("encoding with HF tokenizers, tiktoken cannot reproduce this tokenizer.json: %s", e)
        return None


class Tokenizer:
    """GPT-4-style byte-level BPE with nanochat's special tokens and chat format."""

    def __init__(self, hf: HFTokenizer, use_tiktoken: bool = True):
        """use_tiktoken=False encodes with HF even where tiktoken could (benchmarks and equivalence tests)."""
        vocab = hf.get_vocab(with_added_tokens=True)
        missing = [name for name in SPECIAL_TOKENS if name not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        hf.encode_special_tokens = True  # text never yields a special id (not stored in tokenizer.json)
        self._hf = hf
        self._special_ids = {name: vocab[name] for name in SPECIAL_TOKENS}
        self._special_id_set = frozenset(self._special_ids.values())
        self._tiktoken = _tiktoken_or_none(hf) if use_tiktoken else None

    # ------------------------------------------------------------------ training and serialisation

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train on an iterable of documents; vocab_size counts the special tokens too."""
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + {n_special} special tokens), got {vocab_size}")
        hf = HFTokenizer(BPE())  # no unk token: every byte is in the alphabet
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable symbols
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(
            vocab_size=vocab_size - n_special,  # specials are added afterwards, at the end of the id range
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(texts, trainer)
        hf.add_special_tokens(SPECIAL_TOKENS)
        if hf.get_vocab_size() < vocab_size:
            # BPE stops when no pair is left to merge: the corpus was too small for this vocabulary
            log.warning("trained %d tokens, fewer than the %d asked for: corpus too small", hf.get_vocab_size(), vocab_size)
        return cls(hf)

    @classmethod
    def from_json(cls, data: str, use_tiktoken: bool = True) -> Tokenizer:
        return cls(HFTokenizer.from_str(data), use_tiktoken)

    def to_json(self) -> str:
        """The tokenizer.json content (HF format, loadable by any `tokenizers` user)."""
        return self._hf.to_str()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")

    # ------------------------------------------------------------------ ids

    @property
    def encoder(self) -> str:
        """Which library encodes: "tiktoken" or "hf"."""
        return "hf" if self._tiktoken is None else "tiktoken"

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a special token; they are {SPECIAL_TOKENS}") from None

    def id_to_token(self, id: int) -> str:
        """The vocabulary entry of an id: bytes shown as printable symbols (e.g. 'Ġthe' for ' the')."""
        token = self._hf.id_to_token(id)
        if token is None:
            raise ValueError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def id_to_bytes(self, id: int) -> bytes:
        """The exact bytes an ordinary token stands for (decode() of one id may cut a UTF-8 character);
        b"" for a special token, which marks structure and stands for no text (bits-per-byte counts 0)."""
        if id in self._special_id_set:
            return b""
        table = _byte_decoder()
        return bytes(table[c] for c in self.id_to_token(id))

    # ------------------------------------------------------------------ encode / decode

    def _resolve(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None
    ) -> list[int] | list[list[int]]:
        """Encode a str to ids, or a list of str to a list of id lists (in parallel).
        prepend/append: a special token name or an id to add around each text."""
        if not isinstance(text, (str, list)):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        rows = self._encode_batch([text] if isinstance(text, str) else text)
        head = [] if prepend is None else [self._resolve(prepend)]
        tail = [] if append is None else [self._resolve(append)]
        if head or tail:
            rows = [head + row + tail for row in rows]
        return rows[0] if isinstance(text, str) else rows

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is None:
            # the _fast variant skips offset tracking, which encode() pays for even for a single text
            return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        if len(texts) <= 1:
            return [self._tiktoken.encode_ordinary(t) for t in texts]
        # encode_ordinary never matches special tokens in text, and releases the GIL: threads run in parallel
        return self._tiktoken.encode_ordinary_batch(texts, num_threads=min(len(texts), os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ chat format

    def _render(self, conversation: dict) -> tuple[list[int], list[int]]:
        """ids and mask of a whole conversation, untruncated."""
        messages = _merge_system(conversation.get("messages") or [])
        sp = self._special_ids
        ids: list[int] = [self.get_bos_token_id()]
        mask: list[int] = [0]

        def add(token_ids: list[int], train: int) -> None:
            ids.extend(token_ids)
            mask.extend([train] * len(token_ids))

        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise ValueError(
                    f"message {i} has role {message.get('role')!r} but should be {expected!r}: "
                    "after an optional system message, roles must alternate user, assistant, user, ..."
                )
            content = message.get("content")
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
                add([sp["<|user_start|>"], *self.encode(content), sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)  # given at inference: the prompt ends with it
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i}: assistant content must be a str or a list of parts, got {type(content).__name__}")
            for part in parts:
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {i}: a {kind!r} part needs a str 'text', got {type(text).__name__}")
                part_ids = self.encode(text)
                if kind == "text":
                    add(part_ids, 1)
                elif kind == "python":  # the model writes the tool call: trained on
                    add([sp["<|python_start|>"], *part_ids, sp["<|python_end|>"]], 1)
                elif kind == "python_output":  # the tool writes this at inference: not trained on
                    add([sp["<|output_start|>"], *part_ids, sp["<|output_end|>"]], 0)
                else:
                    raise ValueError(f"message {i}: unknown part type {kind!r} (text, python, python_output)")
            add([sp["<|assistant_end|>"]], 1)  # the model must learn to stop
        return ids, mask

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its mask (1 = assistant token to train on), cut to max_tokens.

        conversation: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}: an
        optional system message (merged into the first user message), then user and assistant in turn.
        Content is a str, or for the assistant a list of parts {"type": "text" | "python" |
        "python_output", "text": str}. Trained on: assistant text, python calls with their delimiters,
        <|assistant_end|>. Not trained on: everything else, tool output included."""
        ids, mask = self._render(conversation)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt that asks the assistant for its next message: a final assistant message is dropped
        (RL samples it anew), a final user message kept (serving), then <|assistant_start|> appended.
        Not truncated: cutting a prompt is the caller's decision."""
        messages = conversation.get("messages") or []
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self._render({**conversation, "messages": messages})
        return [*ids, self._special_ids["<|assistant_start|>"]]

    def render_for_continuation(self, conversation: dict) -> list[int]:
        """The prompt that asks the assistant to go on with its final message, as far as it is written: the
        conversation as trained, without that message's <|assistant_end|>."""
        messages = conversation.get("messages") or []
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("the final message must be the assistant's: it is the one continued")
        ids, _ = self._render(conversation)
        return ids[:-1]


def _merge_system(messages: list[dict]) -> list[dict]:
    """Fold a leading system message into the first user message (the format has no system role)."""
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    if messages[0].get("role") != "system":
        return messages
    if len(messages) < 2 or messages[1].get("role") != "user":
        raise ValueError("a system message must be followed by a user message")
    system, user = messages[0].get("content"), messages[1].get("content")
    if not isinstance(system, str) or not isinstance(user, str):
        raise ValueError("system and user contents must be str")
    return [{**messages[1], "content": system + "\n\n" + user}, *messages[2:]]
