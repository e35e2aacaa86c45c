"""Chat evals (trainer/evals/chat.py): letter logits for multiple choice, sampling for open-ended tasks,
pass@k, ChatCORE, skipped tasks, and the split of problems over ranks."""

import json
import os
import shutil
import string
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cli.main import main as cli_main
from nanochat.checkpoint import write_checkpoint
from nanochat.config import Config
from nanochat.generate import complete_chat
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from services.layout import TOKENIZER_KEY
from tests.support.checkpoints import upload_checkpoint
from tests.support.gpt_fixtures import scrambled_model
from trainer.evals.chat import (
    Score,
    chatcore,
    evaluate_chat,
    letter_token_ids,
    run_chat_eval,
    score_task,
)
from trainer.tasks import hub as hub_module
from trainer.tasks.arc import ARC
from trainer.tasks.base import Task
from trainer.worker import Worker

CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))
QUESTIONS = ["Which is a gas?", "What do plants need to grow?", "Which planet is closest to the sun?",
             "What melts ice?", "Which animal can fly?", "What is 2 + 2?", "Which is a mammal?"]
GOLD = ["A", "C", "B", "D", "C", "A", "B"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # no merges: every byte is one token, so every letter is a single token
    return Tokenizer.train_from_iterator(["abc"], 256 + len(SPECIAL_TOKENS))


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    """A tiny GPT with weights large enough that its predictions depend on the prompt."""
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    return scrambled_model(config, seed, scale=2.0)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return tiny_model(tok.vocab_size)


def arc_rows(questions=QUESTIONS, gold=GOLD) -> list[dict]:
    """ARC rows in the hub's schema; questions of different lengths, so batches need padding."""
    return [{"question": q, "choices": {"text": [f"choice {c} of {q}" for c in "ABCD"], "label": list("ABCD")},
             "answerKey": g} for q, g in zip(questions, gold)]


@pytest.fixture(scope="module")
def arc() -> ARC:
    return ARC("arc-easy", arc_rows())


class LetterBoost(nn.Module):
    """A real model whose logit for one token is raised by `boost` at every position."""

    def __init__(self, inner: GPT, token_id: int, boost: float = 100.0):
        super().__init__()
        self.inner, self.token_id, self.boost = inner, token_id, boost

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.inner(idx).clone()
        logits[..., self.token_id] += self.boost
        return logits


class GoldBoost(nn.Module):
    """A real model biased, row by row, to the gold letter of the problem its input starts with."""

    def __init__(self, inner: GPT, gold_by_prompt: dict[tuple[int, ...], int]):
        super().__init__()
        self.inner, self.gold_by_prompt = inner, gold_by_prompt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.inner(idx).clone()
        for row in range(idx.size(0)):
            tokens = idx[row].tolist()
            (gold,) = [g for p, g in self.gold_by_prompt.items() if tuple(tokens[: len(p)]) == p]
            logits[row, :, gold] += 100.0
        return logits


def predicted_letters_one_by_one(model: nn.Module, tok: Tokenizer, task: Task) -> list[str]:
    """The reference: each prompt alone (no batch, no padding), argmax over its letters' logits."""
    out = []
    with torch.no_grad():
        for conversation in task:
            ids = tok.render_for_completion(conversation)
            logits = model(torch.tensor([ids]))[0, -1]
            letters = conversation["letters"]
            out.append(letters[int(logits[letter_token_ids(tok, letters)].argmax())])
    return out


def gold(task: Task) -> list[str]:
    return [c["messages"][-1]["content"] for c in task]


# ---------------------------------------------------------------------------------------------
# multiple choice


def test_categorical_prediction_is_the_letter_with_the_highest_logit(model, tok, arc):
    predicted = predicted_letters_one_by_one(model, tok, arc)
    expected = sum(p == g for p, g in zip(predicted, gold(arc))) / len(arc)
    # batches of 3 mix prompt lengths: the answer position must be each prompt's own last token
    score = score_task(model, tok, arc, -1, 1, 8, 0.0, None, CPU, batch_size=3)
    assert score.problems == len(arc) and score.accuracy == pytest.approx(expected)


def test_a_boosted_letter_is_always_the_answer(model, tok, arc):
    boosted = LetterBoost(model, tok.encode("C")[0])
    accuracy = evaluate_chat(boosted, tok, arc, -1, 1, 8, 0.0, None, CPU)
    assert accuracy == pytest.approx(GOLD.count("C") / len(GOLD))


def test_only_the_problems_letters_compete(model, tok, arc):
    # "E" is no choice of these problems: boosting it must change nothing
    boosted = LetterBoost(model, tok.encode("E")[0])
    assert evaluate_chat(boosted, tok, arc, -1, 1, 8, 0.0, None, CPU) == evaluate_chat(model, tok, arc, -1, 1, 8, 0.0, None, CPU)


def test_a_model_biased_to_the_gold_letters_scores_one(model, tok, arc):
    by_prompt = {tuple(tok.render_for_completion(c)): tok.encode(c["messages"][-1]["content"])[0] for c in arc}
    biased = GoldBoost(model, by_prompt)
    assert predicted_letters_one_by_one(model, tok, arc) != gold(arc), "the unbiased model must not already be perfect"
    assert evaluate_chat(biased, tok, arc, -1, 1, 8, 0.0, None, CPU, batch_size=4) == 1.0


def test_max_problems_takes_the_first_problems(model, tok, arc):
    # the task's own (shuffled) order: its first three are a fair sample
    first = gold(arc)[:3]
    assert first.count("A") != GOLD.count("A") * 3 / len(GOLD), "must differ from the whole task's share"
    boosted = LetterBoost(model, tok.encode("A")[0])
    assert evaluate_chat(boosted, tok, arc, 3, 1, 8, 0.0, None, CPU) == pytest.approx(first.count("A") / 3)


# ---------------------------------------------------------------------------------------------
# generative


class ExpectedReply(Task):
    """Right when the reply is exactly the conversation's "expected" text."""

    name, eval_type = "expected-reply", "generative"

    def __init__(self, expected: list[str]):
        self.expected = expected

    def __len__(self) -> int:
        return len(self.expected)

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"question {index}"}], "expected": self.expected[index]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response == conversation["expected"]


class Graded(Task):
    """Right when the reply contains a letter of `accepted`; keeps every reply it grades."""

    name, eval_type = "graded", "generative"

    def __init__(self, n: int, accepted: str):
        self.n, self.accepted, self.graded = n, accepted, []

    def __len__(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"q{index}"}], "index": index}

    def evaluate(self, conversation: dict, response: str) -> bool:
        right = any(c in self.accepted for c in response)
        self.graded.append((conversation["index"], right))
        return right


def test_generative_accuracy_grades_the_greedy_replies(model, tok):
    # what complete_chat (greedy) answers to questions 0, 2, 4 is expected; 1 and 3 expect something else
    probe = ExpectedReply([""] * 5)
    replies = [complete_chat(model, tok, probe[i], max_tokens=6) for i in range(5)]
    assert all(replies), "the tiny model must say something"
    task = ExpectedReply([r if i % 2 == 0 else r + "!" for i, r in enumerate(replies)])
    score = score_task(model, tok, task, -1, 1, 6, 0.0, None, CPU)
    assert (score.problems, score.passed, score.samples, score.right) == (5, 3, 5, 3)


def test_pass_at_k_counts_a_problem_once_if_any_sample_is_right(model, tok):
    task = Graded(6, accepted=string.ascii_lowercase[:8])
    score = score_task(model, tok, task, -1, 4, 3, 1.0, None, CPU)
    outcomes = {}
    for index, right in task.graded:
        outcomes.setdefault(index, []).append(right)
    assert sorted(outcomes) == list(range(6)) and all(len(o) == 4 for o in outcomes.values())
    assert score.passed == sum(any(o) for o in outcomes.values())
    assert score.right == sum(sum(o) for o in outcomes.values())
    assert 0 < score.passed < 6 and score.right < 4 * score.passed, "a mixed outcome makes the check meaningful"
    assert score.accuracy == score.passed / 6 and score.pass_at_1 == score.right / 24


def test_score_arithmetic():
    score = Score()
    for outcomes in ([False, False, True], [False, False, False], [True, True, True]):
        score.add(outcomes)
    assert score.accuracy == pytest.approx(2 / 3) and score.pass_at_1 == pytest.approx(4 / 9)


# ---------------------------------------------------------------------------------------------
# ChatCORE and the whole eval


def test_chatcore_centers_multiple_choice_on_a_quarter_and_open_ended_on_zero():
    assert chatcore({"arc-easy": 0.25, "gsm8k": 0.5}) == pytest.approx(0.25)
    assert chatcore({"arc-challenge": 0.4, "humaneval": 0.1}) == pytest.approx((0.15 / 0.75 + 0.1) / 2)
    assert chatcore({"mmlu": 1.0, "arc-easy": 1.0, "gsm8k": 1.0}) == pytest.approx(1.0)
    assert chatcore({"mmlu": 0.25}) == 0.0
    assert chatcore({}) is None


def test_unavailable_tasks_are_skipped_with_the_reason(model, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "DEFAULT_CACHE", tmp_path / "task_cache")  # nothing cached
    (tmp_path / "arc_easy_test.jsonl").write_text("\n".join(json.dumps(r) for r in arc_rows()))
    cfg = Config.model_validate({"data": {"tasks_dir": str(tmp_path), "offline": True},
                                 "chat_eval": {"tasks": ["arc-easy", "mmlu"]}})
    result = run_chat_eval(LetterBoost(model, tok.encode("C")[0]), tok, cfg, None, CPU)
    assert result["results"] == {"arc-easy": pytest.approx(GOLD.count("C") / len(GOLD))}
    assert list(result["skipped"]) == ["mmlu"] and "offline" in result["skipped"]["mmlu"]
    expected_core = (result["results"]["arc-easy"] - 0.25) / 0.75
    assert result["chatcore"] == pytest.approx(expected_core)
    json.dumps(result)  # what eval_worker writes to runs/<run>/evals/<stage>_chat.json


# ---------------------------------------------------------------------------------------------
# ranks


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tok = Tokenizer.train_from_iterator(["abc"], 256 + len(SPECIAL_TOKENS))
        model = tiny_model(tok.vocab_size)
        worker = Worker(rank=rank, world_size=2, device=torch.device("cpu"))
        categorical = score_task(model, tok, ARC("arc-easy", arc_rows()), -1, 1, 4, 0.0, None, worker, batch_size=2)
        generative = score_task(model, tok, Graded(5, "abcdefgh"), -1, 3, 3, 1.0, None, worker)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"categorical": vars(categorical), "generative": vars(generative)}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_problems_and_sum_the_counts(model, tok, tmp_path):
    # fork, not spawn: the children start at once instead of importing torch again (seconds each)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    single = {"categorical": vars(score_task(model, tok, ARC("arc-easy", arc_rows()), -1, 1, 4, 0.0, None, CPU)),
              "generative": vars(score_task(model, tok, Graded(5, "abcdefgh"), -1, 3, 3, 1.0, None, CPU))}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


# ---------------------------------------------------------------------------------------------
# the command, as a Ray Train job


def publish_checkpoint(storage, run: str, stage: str, model: GPT, tok: Tokenizer) -> None:
    """A stage's checkpoint and the tokenizer in storage, as training would leave them."""
    storage.write_text(TOKENIZER_KEY, tok.to_json())
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model_state=model.state_dict(), optimizer_state=None, cursor=None,
                         config=Config().model_dump(), rng=None,
                         meta={"stage": stage, "world_size": 1, "model_config": vars(model.config)})
        upload_checkpoint(storage, run, stage, 1, tmp)


@pytest.mark.system  # a Ray job
@pytest.mark.slow
def test_eval_chat_command_writes_results_and_skips_tasks_without_data(tok, local_storage, shared_data, tmp_path, capsys):
    # the Ray workers read the default task cache: MMLU must not be there for it to be skipped
    if any(f.is_file() for f in (hub_module.DEFAULT_CACHE.expanduser() / "cais" / "mmlu").rglob("*")):
        pytest.skip("MMLU is in this machine's task cache, so it would not be skipped")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    shutil.copy(shared_data / "core" / "arc_easy.jsonl", tasks_dir / "arc_easy.jsonl")
    shutil.copy(shared_data / "chat" / "gsm8k_test.jsonl", tasks_dir / "gsm8k_test.jsonl")
    publish_checkpoint(local_storage, "chat-eval", "sft", tiny_model(tok.vocab_size), tok)
    sets = [f"data.tasks_dir={tasks_dir}", "data.offline=true", "chat_eval.max_problems=6",
            "chat_eval.max_new_tokens=8", "train.workers=2"]
    argv = ["eval", "chat", "--storage", str(local_storage.root), "--run", "chat-eval", "--tasks", "arc-easy,gsm8k,mmlu"]
    assert cli_main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(local_storage.read_text("runs/chat-eval/evals/sft_chat.json"))
    assert saved["stage"] == "sft" and saved["kind"] == "chat" and saved["step"] == 1
    assert set(saved["results"]) == {"arc-easy", "gsm8k"} and list(saved["skipped"]) == ["mmlu"]
    assert 0.0 <= saved["results"]["arc-easy"] <= 1.0
    assert saved["chatcore"] == pytest.approx(chatcore(saved["results"]))
    assert line["stage"] == "eval_chat" and line["metrics"]["results"] == saved["results"]
