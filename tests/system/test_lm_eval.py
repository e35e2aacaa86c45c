"""lm-evaluation-harness (PyPI `lm-eval`) as a real client: its `local-completions` model scores a
multiple-choice task, from a task file written here, against a running server (serving/api over a real
engine under uvicorn), and agrees item by item with our own chat eval (trainer/chat_eval.py) on the same
real ARC-Easy items.

Notable:
- the same scoring on both sides. Our eval renders each problem as a chat prompt ending with
  <|assistant_start|> and picks the likeliest of the problem's letters at that position; the task file's
  context is that rendered prompt's text and its choices are the bare letters (no target delimiter), so
  the harness's loglikelihood of a choice is the log-probability of its letter after the prompt: the same
  argmax, from the server's prompt log-probabilities (echo + logprobs, max_tokens 1).
- the harness tokenizes requests itself and sends token ids: its Hugging Face tokenizer is loaded from a
  folder holding our tokenizer.json, in which the special tokens' names in the context become their ids.
  It sends them in batches of 4 (batch_size): a list of prompts per request, each answered in turn.
- the loglikelihoods the harness logged are also checked against a full forward of the model: were the
  server's log-probabilities wrong, shifted or cut, they and the accuracy would differ.
"""

import json
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from tests.support.gpt_fixtures import scrambled_model
from tests.system.test_api import serve
from trainer.evals.chat import letter_token_ids, score_categorical
from trainer.tasks.arc import ARC
from trainer.worker import Worker

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it

ITEMS = 24  # the first ARC-Easy items of the shared test data
MODEL = "nanochat-test"
TASK = "nanochat_arc_easy"
CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture
def arc(shared_data: Path) -> ARC:
    lines = (shared_data / "core" / "arc_easy.jsonl").read_text(encoding="utf-8").splitlines()[:ITEMS]
    return ARC("arc-easy", [json.loads(line) for line in lines])


@pytest.fixture
def tok(arc: ARC) -> Tokenizer:
    texts = [arc[i]["messages"][0]["content"] for i in range(len(arc))]
    return Tokenizer.train_from_iterator(texts, 700)


@pytest.fixture
def model(tok: Tokenizer) -> GPT:
    config = GPTConfig(sequence_len=512, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return scrambled_model(config, seed=3, scale=2.0)


@pytest.fixture
def base_url(model: GPT, tok: Tokenizer):
    engine = AsyncEngine(LLMEngine(model, tok, num_blocks=256, block_size=16, max_num_seqs=8,
                                   max_num_batched_tokens=256))
    try:
        with serve(create_app(engine, tok, model_name=MODEL, max_prompt_tokens=512)) as url:
            yield url
    finally:
        engine.shutdown()


def hf_tokenizer_dir(tok: Tokenizer, folder: Path) -> Path:
    """A Hugging Face tokenizer folder of our tokenizer, as the harness loads one."""
    folder.mkdir()
    tok.save(folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def task_dir(arc: ARC, tok: Tokenizer, folder: Path) -> Path:
    """The task file and its data: each item's context is its rendered chat prompt, its choices its letters."""
    folder.mkdir()
    data = folder / "items.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(len(arc)):
            conversation = arc[i]
            letters = conversation["letters"]
            f.write(json.dumps({"prompt": tok.decode(tok.render_for_completion(conversation)), "letters": letters,
                                "gold": letters.index(conversation["messages"][-1]["content"])}) + "\n")
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "cache"}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: letters
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return folder


def reference_logprobs(model: GPT, tok: Tokenizer, conversation: dict) -> list[float]:
    """Each letter's log-probability after the rendered prompt, from a full forward."""
    prompt = tok.render_for_completion(conversation)
    with torch.no_grad():
        row = model(torch.tensor([prompt]))[0, -1].float().log_softmax(dim=-1)
    return row[letter_token_ids(tok, conversation["letters"])].tolist()


def test_lm_eval_harness_over_the_server_agrees_with_our_chat_eval_item_by_item(arc, tok, model, base_url, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"model": MODEL, "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "huggingface",
                  "tokenizer": str(hf_tokenizer_dir(tok, tmp_path / "tokenizer")), "tokenized_requests": True,
                  "num_concurrent": 2, "batch_size": 4, "max_retries": 1}  # 4 prompts per request
    results = simple_evaluate(model="local-completions", model_args=model_args, tasks=[TASK],
                              task_manager=TaskManager(include_path=str(task_dir(arc, tok, tmp_path / "task"))),
                              log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(arc)))

    ours = [score_categorical(model, tok, arc, range(i, i + 1), CPU).passed for i in range(len(arc))]
    theirs = [int(s["acc"]) for s in samples]
    assert theirs == ours  # item by item
    assert results["results"][TASK]["acc,none"] == pytest.approx(score_categorical(model, tok, arc, range(len(arc)),
                                                                                   CPU).accuracy)
    assert 0 < sum(ours) < len(arc)  # neither all right nor all wrong: the comparison can tell
    for i, sample in enumerate(samples):
        loglikelihoods = [ll for ll, _ in sample["filtered_resps"]]
        assert loglikelihoods == pytest.approx(reference_logprobs(model, tok, arc[i]), abs=1e-4), i
