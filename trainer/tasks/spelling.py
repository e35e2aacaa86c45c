"""
Spelling tasks (nanochat's spellingbee): counting a letter in a word, and spelling words out.

Notable:
- "spelling" (SpellingBee): "How many r are in strawberry?" answered by spelling the word out with a
  running count, then checking with the calculator ('strawberry'.count('r') as a python call and its
  output), then "#### 3"; graded like GSM8K, on the number after "####"
- "simple-spelling" (SimpleSpelling): "Spell the word: cat" -> "cat:c,a,t", the part that makes counting
  hard for a model that sees tokens, not letters; graded by exact match
- example i is generated from random.Random(i) (test: i + 10M), so any example can be made on demand
- the word list: words_alpha.txt (370K English words, the list nanochat downloads) from data.tasks_dir,
  the cache, storage or its URL; offline or when the download fails, the words of the standard library's
  docstrings (trainer/tasks/stdlib_docs.py), so the tasks exist on every machine
- user messages come from nanochat's templates, in several languages, with varied quoting and casing
"""

from __future__ import annotations

import logging
import random
import string
from pathlib import Path

from nanochat.config import Config
from trainer.tasks.base import Task, TaskUnavailable, exchange
from trainer.tasks.gsm8k import extract_answer, final_answer
from trainer.tasks.hub import check_text, fetch
from trainer.tasks.stdlib_docs import stdlib_words

log = logging.getLogger(__name__)

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST_FILE = "words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000  # above the word list's size: train and test draw from different seeds
SIZES = {"train": 10_000, "test": 1_000}

USER_TEMPLATES = (
    "How many {letter} are in the word {word}", "How many {letter} are in {word}", "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}", "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there", "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}", "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}", "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}", "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}", "How many {letter}'s are in {word}", "Count all the {letter} in {word}",
    "How many times is {letter} in {word}", "Number of {letter} in {word}", "Total count of {letter} in {word}",
    "How many {letter} does {word} have", "How many {letter} does {word} contain", "{word} has how many {letter}",
    "In {word}, count the {letter}", "Give me the count of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?", "Cuenta las {letter} en {word}",
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "{word}에 {letter}가 몇 개 있나요",
    "Combien de {letter} dans {word}", "Compte les {letter} dans {word}", "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor", "{word}に{letter}は何個ありますか",
)  # fmt: skip


def load_words(cfg: Config, storage=None) -> list[str]:
    """words_alpha.txt from data.tasks_dir / cache / storage / its URL, else the stdlib docstrings' words."""
    local = Path(cfg.data.tasks_dir).expanduser() / WORD_LIST_FILE if cfg.data.tasks_dir else None
    try:
        path = local if local is not None and local.is_file() else fetch(
            WORD_LIST_URL, f"words/{WORD_LIST_FILE}", "spelling", storage, offline=cfg.data.offline, check=check_text
        )
    except TaskUnavailable as e:
        words = list(stdlib_words())
        # offline this is the expected path; a failed download deserves a warning
        level = logging.INFO if cfg.data.offline else logging.WARNING
        log.log(level, "spelling: no word list (%s); using %d words from the standard library's docstrings", e.reason, len(words))
        return words
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    return [w for w in words if w.isalpha()]


def _seed(index: int, split: str) -> int:
    return index + (TEST_SEED_OFFSET if split == "test" else 0)


class SpellingBee(Task):
    name = "spelling"
    eval_type = "generative"

    def __init__(self, words: list[str], size: int, split: str = "train"):
        self.words, self.size, self.split = words, size, split

    def __len__(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(_seed(index, self.split))
        word = rng.choice(self.words)
        # mostly a letter of the word, sometimes one it lacks (the answer 0 must be learnt too)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        template = rng.choice(USER_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        user = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user += "?"
        return exchange(user, self._solution(word, letter))

    @staticmethod
    def _solution(word: str, letter: str) -> list[dict]:
        count = word.count(letter)
        text = (
            f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n"
        )
        running = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running += 1
                # no space between the index and the letter: " a" and "a" are different tokens
                text += f"{i}:{char} hit! count={running}\n"
            else:
                text += f"{i}:{char}\n"
        text += f"\nThis gives us {running}."
        return [
            {"type": "text", "text": text},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = final_answer(conversation)
        return reference is not None and extract_answer(response) == reference


class SimpleSpelling(Task):
    name = "simple-spelling"
    eval_type = "generative"

    def __init__(self, words: list[str], size: int, split: str = "train"):
        self.words = list(words)
        random.Random(42).shuffle(self.words)  # another word order than SpellingBee's for the same seeds
        self.size, self.split = size, split

    def __len__(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        word = random.Random(_seed(index, self.split)).choice(self.words)
        return exchange(f"Spell the word: {word}", f"{word}:{','.join(word)}")

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]


def _size(split: str, max_examples: int) -> int:
    if split not in SIZES:
        raise ValueError(f"the spelling tasks have no split {split!r}; they have {', '.join(SIZES)}")
    return SIZES[split] if max_examples < 0 else min(max_examples, SIZES[split])


def build_bee(cfg: Config, split: str, storage=None, max_examples: int = -1) -> SpellingBee:
    return SpellingBee(load_words(cfg, storage), _size(split, max_examples), split)


def build_simple(cfg: Config, split: str, storage=None, max_examples: int = -1) -> SimpleSpelling:
    return SimpleSpelling(load_words(cfg, storage), _size(split, max_examples), split)
