"""Chat tasks: conversations built from real items (shared data) and from small files in the hub's
formats, graders, mixtures, and the download path against a local HTTP server (never the internet)."""

import json
import re
import string
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.config import Config
from trainer.tasks import TaskMixture, TaskUnavailable, build_mixture, build_task
from trainer.tasks import hub as hub_module
from trainer.tasks.base import Task
from trainer.tasks.gsm8k import extract_answer
from trainer.tasks.hub import fetch
from trainer.tasks.stdlib_docs import first_paragraph, stdlib_entries, stdlib_words


def make_cfg(tasks_dir=None, offline=True) -> Config:
    return Config.model_validate({"data": {"tasks_dir": str(tasks_dir) if tasks_dir else None, "offline": offline}})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def assert_alternates(conversation: dict) -> None:
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


@pytest.fixture(autouse=True)
def task_cache(tmp_path, monkeypatch) -> Path:
    """Downloads land in a per-test cache, never in the developer's ~/.cache."""
    cache = tmp_path / "task_cache"
    monkeypatch.setattr(hub_module, "DEFAULT_CACHE", cache)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


# -----------------------------------------------------------------------------
# multiple choice


def test_arc_from_the_core_bundle_files(shared_data):
    raw = {row["query"].removeprefix("Question: "): row for row in read_jsonl(shared_data / "core" / "arc_easy.jsonl")}
    task = build_task("arc-easy", make_cfg(shared_data / "core"), "test")
    assert task.eval_type == "categorical" and len(task) == len(raw)
    for conversation in task:
        user, assistant = conversation["messages"]
        question = re.match(r"Multiple Choice question: (.*?)\n- ", user["content"], re.DOTALL).group(1)
        row = raw[question]
        letters = conversation["letters"]
        assert letters == list(string.ascii_uppercase[: len(row["choices"])])
        for letter, choice in zip(letters, row["choices"]):
            assert f"- {choice}={letter}\n" in user["content"]  # no space before the letter
        assert user["content"].endswith("Respond only with the letter of the correct answer.")
        assert assistant["content"] == letters[row["gold"]]
        assert task.evaluate(conversation, letters[row["gold"]])
        assert not task.evaluate(conversation, letters[(row["gold"] + 1) % len(letters)])


def test_arc_in_the_hub_schema_keeps_its_own_labels(tmp_path):
    rows = [
        {"id": "q1", "question": "Which is a planet?", "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "q2", "question": "2+2?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
    ]
    write_parquet(tmp_path / "arc_challenge_train.parquet", rows)
    task = build_task("arc-challenge", make_cfg(tmp_path), "train")
    by_answer = {c["messages"][1]["content"]: c for c in task}
    assert set(by_answer) == {"B", "2"}
    assert by_answer["2"]["letters"] == ["1", "2", "3", "4"]
    assert "- 4=2\n" in by_answer["2"]["messages"][0]["content"]
    assert by_answer["B"]["messages"][0]["content"].startswith("Multiple Choice question: Which is a planet?\n- Sun=A\n")
    # no test file in the folder: offline, that split is unavailable rather than silently the train data
    with pytest.raises(TaskUnavailable, match="arc_challenge_test.jsonl"):
        build_task("arc-challenge", make_cfg(tmp_path), "test")


def test_mmlu_in_the_hub_schema(tmp_path):
    rows = [
        {"question": "What is 7*6?", "subject": "elementary_mathematics", "choices": ["42", "36", "48", "56"], "answer": 0},
        {"question": "H2O is?", "subject": "high_school_chemistry", "choices": ["salt", "water", "air", "gold"], "answer": 1},
    ]
    (tmp_path / "mmlu_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # the hub's auxiliary_train configuration wraps each row in {"train": ...}
    (tmp_path / "mmlu_train.jsonl").write_text(json.dumps({"train": rows[0]}))
    cfg = make_cfg(tmp_path)
    task = build_task("mmlu", cfg, "test")
    got = {c["subject"]: c for c in task}
    assert got["high_school_chemistry"]["messages"][1]["content"] == "B"
    assert got["high_school_chemistry"]["letters"] == ["A", "B", "C", "D"]
    assert "- water=B\n" in got["high_school_chemistry"]["messages"][0]["content"]
    assert task.evaluate(got["elementary_mathematics"], "A") and not task.evaluate(got["elementary_mathematics"], "C")
    assert build_task("mmlu", cfg, "train")[0]["messages"][1]["content"] == "A"


# -----------------------------------------------------------------------------
# generative


def test_gsm8k_calculator_parts_rebuild_the_reference(shared_data):
    raw = {row["question"]: row["answer"] for row in read_jsonl(shared_data / "chat" / "gsm8k_test.jsonl")}
    task = build_task("gsm8k", make_cfg(shared_data / "chat"), "test")
    assert len(task) == len(raw) == 200
    calls = 0
    for conversation in task:
        user, assistant = conversation["messages"]
        answer = raw[user["content"]]
        parts = assistant["content"]
        rebuilt, i = "", 0
        while i < len(parts):
            if parts[i]["type"] == "python":
                assert parts[i + 1]["type"] == "python_output"
                rebuilt += f"<<{parts[i]['text']}={parts[i + 1]['text']}>>"
                calls += 1
                i += 2
            else:
                rebuilt += parts[i]["text"]
                i += 1
        assert rebuilt == answer
        assert all("<<" not in p["text"] and ">>" not in p["text"] for p in parts)
        gold = answer.rsplit("#### ", 1)[1].strip().replace(",", "")
        assert extract_answer(parts[-1]["text"]) == gold
        assert task.evaluate(conversation, f"Let me see... so the answer is\n#### {gold}")
        assert not task.evaluate(conversation, f"#### {int(float(gold)) + 1}")
        assert not task.evaluate(conversation, gold)  # no "####": no answer
        assert task.reward(conversation, f"#### {gold}") == 1.0
    assert calls > 200  # most solutions use the calculator several times


def test_gsm8k_answers_are_compared_without_thousands_separators():
    assert extract_answer("so we get\n#### 1,234") == "1234"
    assert extract_answer("#### -5") == "-5"
    assert extract_answer("the answer is 5") is None


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(shared_data):
    task = build_task("humaneval", make_cfg(shared_data / "chat"), "test", max_examples=5)
    assert len(task) == 5
    for conversation in task:
        prompt = conversation["messages"][0]["content"]
        reference = conversation["messages"][1]["content"]
        assert reference.startswith(prompt)
        assert task.evaluate(conversation, reference)
        assert not task.evaluate(conversation, prompt + "    return None\n")
    # a chatty response with the code in a fenced block is graded on the block
    assert task.evaluate(conversation, f"Here you go:\n```python\n{reference}\n```\nHope it helps!")


def test_humaneval_has_only_a_test_split(shared_data):
    with pytest.raises(ValueError, match="no split 'train'"):
        build_task("humaneval", make_cfg(shared_data / "chat"), "train")


def test_smoltalk_conversations_in_the_hub_schema(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "source": "x"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}], "source": "y"},
    ]
    write_parquet(tmp_path / "smoltalk_train.parquet", rows)
    task = build_task("smoltalk", make_cfg(tmp_path), "train")
    assert sorted(len(c["messages"]) for c in task) == [3, 4]
    assert {c["messages"][0]["content"] for c in task} == {"Be brief.", "2+2?"}

    write_parquet(tmp_path / "smoltalk_test.parquet", [{"messages": [{"role": "assistant", "content": "no user"}, {"role": "user", "content": "?"}]}])
    with pytest.raises(ValueError, match="role"):
        build_task("smoltalk", make_cfg(tmp_path), "test")[0]


def test_smoltalk_offline_without_files_is_unavailable_with_the_reason():
    with pytest.raises(TaskUnavailable) as e:
        build_task("smoltalk", make_cfg(), "train")
    assert e.value.task == "smoltalk"
    assert "data.offline" in e.value.reason and "smol-smoltalk" in e.value.reason and "data.tasks_dir" in e.value.reason


# -----------------------------------------------------------------------------
# generated tasks


def test_identity_conversations_are_deterministic_and_varied():
    task = build_task("identity", make_cfg(), "train")
    again = build_task("identity", make_cfg(), "train")
    test = build_task("identity", make_cfg(), "test")
    assert len(task) == 1000 and len(test) == 100
    conversations = list(task)
    assert conversations == list(again)
    assert list(test) != conversations[:100]  # other seeds (short conversations can still coincide)
    assert len({json.dumps(c) for c in conversations}) > 800
    for c in conversations:
        assert_alternates(c)
    turns = Counter(len(c["messages"]) // 2 for c in conversations)
    assert len(turns) >= 3  # single- and multi-turn
    assert sum("nanochat" in m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant") > 500
    assert len({c["messages"][0]["content"] for c in conversations}) > 50


def test_identity_from_a_file_replaces_the_generator(tmp_path):
    lines = [[{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "I'm nanochat."}],
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "identity.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    task = build_task("identity", make_cfg(tmp_path), "train")
    assert sorted(c["messages"][0]["content"] for c in task) == ["hi", "who are you"]


def test_spelling_bee_counts_with_a_calculator_call(tmp_path):
    (tmp_path / "words_alpha.txt").write_text("strawberry\r\nbanana\r\nmississippi\r\n")
    task = build_task("spelling", make_cfg(tmp_path), "train", max_examples=50)
    assert len(task) == 50
    for c in task:
        parts = c["messages"][1]["content"]
        call = next(p for p in parts if p["type"] == "python")["text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call).groups()
        assert word in {"strawberry", "banana", "mississippi"}
        output = next(p for p in parts if p["type"] == "python_output")["text"]
        assert output == str(word.count(letter)) == str(eval(call))  # the test's own check of the call
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert task.evaluate(c, f"#### {word.count(letter)}")
        assert not task.evaluate(c, f"#### {word.count(letter) + 1}")
    assert task[3] == build_task("spelling", make_cfg(tmp_path), "train")[3]  # any example, on demand


def test_spelling_offline_falls_back_to_stdlib_words():
    words = set(stdlib_words())
    assert len(words) > 1000
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 12 for w in words)
    task = build_task("simple-spelling", make_cfg(), "test", max_examples=20)
    for c in task:
        word = c["messages"][0]["content"].removeprefix("Spell the word: ")
        assert word in words
        assert task.evaluate(c, f"{word}:{','.join(word)}")
        assert not task.evaluate(c, f"{word}:{','.join(word[::-1])}x")


def test_stdlib_docs_answers_come_from_the_docstrings():
    import json as json_module

    entries = {e.qualname: e for e in stdlib_entries()}
    assert entries["json.dumps"].doc == first_paragraph(json_module.dumps.__doc__)
    assert entries["str.split"].kind == "method"
    train, test = build_task("stdlib-docs", make_cfg(), "train"), build_task("stdlib-docs", make_cfg(), "test")
    assert len(train) > 500 and len(test) > 50
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in test}
    docs = {e.doc for e in entries.values()}
    for c in list(train)[:200]:
        assert_alternates(c)
        for answer in c["messages"][1::2]:
            assert any(doc in answer["content"] for doc in docs)


# -----------------------------------------------------------------------------
# mixtures and caps


class Numbers(Task):
    eval_type = "generative"

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{self.name} {index}"}, {"role": "assistant", "content": str(index)}]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response == f"{self.name}:{conversation['messages'][1]['content']}"


def test_mixture_weights_repeat_and_subsample_tasks():
    mixture = TaskMixture([Numbers("a", 10), Numbers("b", 20), Numbers("c", 5)], [2, 0.5, 0])
    seen = Counter(c["messages"][0]["content"] for c in mixture)
    assert len(mixture) == 30 and mixture.counts() == {"a": 20, "b": 10}
    assert all(seen[f"a {i}"] == 2 for i in range(10))
    b = [k for k in seen if k.startswith("b ")]
    assert len(b) == 10 and all(seen[k] == 1 for k in b)  # half of b, each once
    order = [c["task"] for c in mixture]
    assert order != sorted(order)  # shuffled, not a in a block then b


def test_mixture_is_deterministic_per_seed_and_dispatches_grading():
    def make(seed):
        return TaskMixture([Numbers("a", 10), Numbers("b", 20)], [1.5, 1], seed=seed)

    first = [c["messages"][0]["content"] for c in make(7)]
    assert first == [c["messages"][0]["content"] for c in make(7)]
    assert first != [c["messages"][0]["content"] for c in make(8)]
    mixture = make(7)
    for c in list(mixture)[:10]:
        name, index = c["messages"][0]["content"].split()
        assert c["task"] == name
        assert mixture.evaluate(c, f"{name}:{index}") and mixture.reward(c, f"{name}:{index}") == 1.0
        assert not mixture.evaluate(c, f"x:{index}")


def test_max_examples_takes_a_prefix_of_the_shuffled_order(shared_data):
    cfg = make_cfg(shared_data / "chat")
    full = build_task("gsm8k", cfg, "test")
    capped = build_task("gsm8k", cfg, "test", max_examples=17)
    assert len(capped) == 17
    assert [capped[i] for i in range(17)] == [full[i] for i in range(17)]
    raw_first = read_jsonl(shared_data / "chat" / "gsm8k_test.jsonl")[0]["question"]
    assert [full[i]["messages"][0]["content"] for i in range(5)] != [raw_first] * 5  # shuffled


def test_build_mixture_skips_unavailable_tasks_with_reasons(shared_data):
    cfg = make_cfg(shared_data / "chat")
    mixture, skipped = build_mixture({"gsm8k": 1.0, "identity": 2.0, "smoltalk": 1.0, "mmlu": 0.0}, cfg, "test")
    assert mixture.counts() == {"gsm8k": 200, "identity": 200}
    assert set(skipped) == {"smoltalk"} and "data.offline" in skipped["smoltalk"]
    with pytest.raises(ValueError, match="unknown task"):
        build_task("hellaswag", cfg, "test")


# -----------------------------------------------------------------------------
# downloads (a local HTTP server; the code path is the one that talks to huggingface.co)


class Hub:
    """Serves files by path; `fail[path]` is a list of HTTP statuses to answer first, one per request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, list[int]] = {}
        self.requests: list[str] = []


@pytest.fixture
def hub():
    state = Hub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            failures = state.fail.get(self.path)
            if failures:
                self.send_error(failures.pop(0))
            elif self.path in state.files:
                body = state.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_download_retries_then_caches_in_storage(hub, local_storage, tmp_path):
    hub.files["/f.parquet"] = parquet_bytes([{"x": 1}, {"x": 2}])
    hub.fail["/f.parquet"] = [503]
    path = fetch(f"{hub.url}/f.parquet", "repo/f.parquet", "t", local_storage, tmp_path / "c1", check=hub_module.check_parquet, backoff_s=0.01)
    assert hub.requests == ["/f.parquet", "/f.parquet"]  # one failure, one retry
    assert pq.read_table(path).column("x").to_pylist() == [1, 2]
    assert local_storage.exists("tasks/repo/f.parquet")
    # another worker (empty local cache), offline: served from storage without a request
    again = fetch(f"{hub.url}/f.parquet", "repo/f.parquet", "t", local_storage, tmp_path / "c2", offline=True)
    assert again.read_bytes() == path.read_bytes() and len(hub.requests) == 2


def test_download_gives_up_at_once_on_404_and_after_retries_on_bad_content(hub, tmp_path):
    with pytest.raises(TaskUnavailable, match="HTTP 404"):
        fetch(f"{hub.url}/missing.parquet", "r/missing.parquet", "t", None, tmp_path, backoff_s=0.01)
    assert hub.requests == ["/missing.parquet"]
    hub.files["/page.parquet"] = b"<html>rate limited</html>"  # an error page with status 200
    with pytest.raises(TaskUnavailable, match="failed after 3 attempts"):
        fetch(f"{hub.url}/page.parquet", "r/page.parquet", "t", None, tmp_path, check=hub_module.check_parquet, attempts=3, backoff_s=0.01)
    assert hub.requests.count("/page.parquet") == 3
    assert not (tmp_path / "r" / "page.parquet").exists()  # nothing half-checked is cached


def test_build_task_downloads_from_the_hub_endpoint(hub, monkeypatch, local_storage, shared_data):
    rows = read_jsonl(shared_data / "chat" / "gsm8k_test.jsonl")[:12]
    hub.files["/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"] = parquet_bytes(rows)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    task = build_task("gsm8k", make_cfg(offline=False), "test", storage=local_storage)
    assert sorted(c["messages"][0]["content"] for c in task) == sorted(r["question"] for r in rows)
    assert local_storage.exists("tasks/openai/gsm8k/main/test-00000-of-00001.parquet")
    # the train split is not on this "hub": unavailable, with the URL and status in the reason
    with pytest.raises(TaskUnavailable, match="HTTP 404"):
        build_task("gsm8k", make_cfg(offline=False), "train", storage=local_storage)
