"""
"stdlib-docs": questions about Python's standard library answered from its own docstrings, an offline
source of real conversations (SmolTalk needs a download).

Notable:
- a fixed list of modules; their public functions, classes and class methods (and the builtins' types'
  methods) with a docstring whose first paragraph reads as a sentence (a bare signature line is skipped)
- a conversation takes 1-3 members of one module: "What does json.dumps do?" -> the signature and the
  docstring's first paragraph, then follow-ups ("And json.loads?"); some open with the module itself.
  Question and answer wordings are drawn from templates with a seeded RNG: deterministic for a given
  Python version (docstrings change between versions)
- test split: the conversations whose first member's name hashes (crc32) to 0 mod 10; train: the rest
- `stdlib_words()`: the lowercase words of the same docstrings, the spelling tasks' offline word list
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass

from nanochat.config import Config
from trainer.tasks.base import RowTask

MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "builtins", "calendar", "cmath", "collections", "colorsys",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "filecmp", "fnmatch",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "io", "inspect", "itertools",
    "json", "keyword", "linecache", "logging", "math", "operator", "os", "os.path", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tempfile",
    "textwrap", "time", "timeit", "tokenize", "unicodedata", "urllib.parse", "uuid", "weakref", "zipfile", "zlib",
)  # fmt: skip
SEED = 1234
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*-+>.*)?$")  # "map(func, *iterables) --> map object"
MIN_CHARS, MAX_CHARS = 20, 600

QUESTIONS = {
    "function": (
        "What does {q} do?", "What does the function {n} in the {m} module do?", "Explain {q}.",
        "How do I use {q} in Python?", "What is {q} for?", "Can you tell me what `{q}` does?",
        "I found {q} in some code. What does it do?", "Describe the {m} function {n}.", "what does {q} do",
    ),
    "method": (
        "What does the {n} method of {owner} do?", "What does {q} do?", "Explain the method {q}.",
        "What is {q} for?", "How does {q} work?",
    ),
    "class": (
        "What is {q}?", "What is the {n} class in {m}?", "Explain the class {q}.", "What is {q} used for?",
        "Tell me about {q}.",
    ),
    "module": (
        "What is the {m} module for?", "What does Python's {m} module do?", "Tell me about the {m} module.",
        "What's in the {m} module?",
    ),
}  # fmt: skip
FOLLOW_UPS = ("And {q}?", "What about {q}?", "Thanks. And what does {q} do?", "How about {q}?", "And {n}?")
ANSWERS = {
    "function": ("`{q}{sig}`: {doc}", "{doc}\n\nIts signature is `{q}{sig}`.", "In Python, `{q}` does this: {doc}"),
    "method": ("`{q}{sig}`: {doc}", "{doc}\n\nIt is called as `{q}{sig}`.", "The `{n}` method of `{owner}`: {doc}"),
    "class": ("`{q}{sig}` is a class in the `{m}` module. {doc}", "`{q}` is a class: {doc}", "{doc}\n\nCreate one with `{q}{sig}`."),
    "module": ("The `{m}` module: {doc}", "{doc}", "`{m}` is a standard library module. {doc}"),
}


@dataclass(frozen=True)
class Entry:
    kind: str  # function | method | class | module
    module: str  # as imported: "os.path"
    name: str  # "join", or "split" for the method str.split
    qualname: str  # "os.path.join", "str.split" (builtins go without the module)
    owner: str  # the class of a method, else ""
    signature: str  # "(a, *p)" or "" when inspect cannot tell
    doc: str  # the docstring's first paragraph


def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph that is prose (not a signature line), on one line, if it fits."""
    for paragraph in re.split(r"\n\s*\n", (doc or "").strip()):
        text = " ".join(paragraph.split())
        if not text or SIGNATURE_LINE.match(text) or text.startswith("--"):
            continue
        return text if MIN_CHARS <= len(text) <= MAX_CHARS else None
    return None


def _own_doc(obj) -> str | None:
    """The object's own docstring: inspect.getdoc would inherit a base class' ("Common base class for
    all non-exit exceptions." for every exception class)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):  # many builtins do not expose one
        return ""


def _public(module) -> list[tuple[str, object]]:
    """Public names the module defines itself (or re-exports from its C accelerator, e.g. _heapq)."""
    names = getattr(module, "__all__", None)
    own = (module.__name__, "_" + module.__name__)
    members = []
    for name in sorted(set(names) if names else (k for k in vars(module) if not k.startswith("_"))):
        obj = getattr(module, name, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if names is None and getattr(obj, "__module__", None) not in own:
            continue  # imported from elsewhere
        members.append((name, obj))
    return members


def _entries_of(module_name: str) -> list[Entry]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a Python built without it (zlib, ...)
        return []
    prefix = "" if module_name == "builtins" else module_name + "."
    entries = []
    if doc := first_paragraph(_own_doc(module)):
        entries.append(Entry("module", module_name, module_name, module_name, "", "", doc))
    for name, obj in _public(module):
        kind = "class" if inspect.isclass(obj) else "function"
        if doc := first_paragraph(_own_doc(obj)):
            entries.append(Entry(kind, module_name, name, prefix + name, "", _signature(obj), doc))
        if kind == "class":
            for method_name, raw in sorted(vars(obj).items()):
                if method_name.startswith("_") or not (inspect.isroutine(raw) or isinstance(raw, (classmethod, staticmethod))):
                    continue
                method = getattr(obj, method_name)
                if doc := first_paragraph(_own_doc(method)):
                    qualname = f"{prefix}{name}.{method_name}"
                    entries.append(Entry("method", module_name, method_name, qualname, prefix + name, _signature(method), doc))
    return entries


@functools.cache
def stdlib_entries() -> tuple[Entry, ...]:
    return tuple(entry for module in MODULES for entry in _entries_of(module))


def _fill(template: str, entry: Entry) -> str:
    return template.format(q=entry.qualname, n=entry.name, m=entry.module, owner=entry.owner, sig=entry.signature, doc=entry.doc)


def _template(rng: random.Random, templates: tuple[str, ...], entry: Entry) -> str:
    usable = [
        t for t in templates
        if not ("{m}" in t and entry.module == "builtins" and entry.kind != "module")
        and not ("{sig}" in t and not entry.signature)
    ]  # fmt: skip
    return rng.choice(usable)


def _question(rng: random.Random, entry: Entry, first: bool) -> str:
    template = _template(rng, QUESTIONS[entry.kind] if first else FOLLOW_UPS, entry)
    if rng.random() < 0.2:  # people often do not bother with capitals (names keep theirs)
        template = template.lower()
    if rng.random() < 0.2:
        template = template.rstrip("?.")
    return _fill(template, entry)


def _conversation(group: list[Entry]) -> dict:
    rng = random.Random(zlib.crc32(group[0].qualname.encode()) + SEED)
    messages = []
    for i, entry in enumerate(group):
        messages.append({"role": "user", "content": _question(rng, entry, first=(i == 0))})
        messages.append({"role": "assistant", "content": _fill(_template(rng, ANSWERS[entry.kind], entry), entry)})
    return {"messages": messages}


@functools.cache
def stdlib_conversations() -> tuple[tuple[dict, bool], ...]:
    """(conversation, is_test) for every group of 1-3 entries of one module, in a fixed order."""
    rng = random.Random(SEED)
    out = []
    for module in MODULES:
        entries = [e for e in stdlib_entries() if e.module == module]
        i = 0
        while i < len(entries):
            size = rng.choice((1, 1, 1, 2, 2, 3))
            group = entries[i : i + size]
            i += size
            out.append((_conversation(group), zlib.crc32(group[0].qualname.encode()) % 10 == 0))
    return tuple(out)


@functools.cache
def stdlib_words(min_len: int = 3, max_len: int = 12) -> tuple[str, ...]:
    """Lowercase alphabetic words of the modules' docstrings seen at least twice (drops most oddities)."""
    counts: Counter[str] = Counter()
    for module in MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        docs = [_own_doc(mod)] + [_own_doc(obj) for _, obj in _public(mod)]
        for doc in docs:
            counts.update(w for w in re.findall(r"[A-Za-z]+", doc or "") if w.islower() and min_len <= len(w) <= max_len)
    return tuple(sorted(w for w, c in counts.items() if c >= 2))


class StdlibDocs(RowTask):
    name = "stdlib-docs"

    def to_conversation(self, row: dict) -> dict:
        return row


def build(cfg: Config, split: str, storage=None, max_examples: int = -1) -> StdlibDocs:
    if split not in ("train", "test"):
        raise ValueError(f"stdlib-docs has no split {split!r}; it has train, test")
    rows = [conv for conv, is_test in stdlib_conversations() if is_test == (split == "test")]
    return StdlibDocs(rows, max_examples)
