"""Beam search (vLLM's use_beam_search) over the API, against a real engine running a GPT whose next-token
distribution is scripted: the greedy path's first token is likelier, but the beam behind it is far likelier
as a whole, so a search two wide must find what greedy decoding misses; widths, length penalty, the end
token and the refusals are checked against sums of the model's own log-probabilities."""

import httpx
import pytest
import torch

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from tests.support.bigram import bigram_model
from tests.system.test_api import all_blocks_free, assert_error, serve, wait_until

MODEL = "beam-test"


def scripted_model(tok: Tokenizer, logits: dict[int, dict[int, float]]) -> GPT:
    """A bigram GPT whose logits after token t are logits[t] (every other token 0)."""
    model = bigram_model(tok, {}, default=0)
    scale = model.lm_head.weight.shape[1] ** 0.5  # the final hidden state is sqrt(n_embd) * e_token
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for token, successors in logits.items():
            for successor, logit in successors.items():
                model.lm_head.weight[successor, token] = logit / scale
    return model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(["abcdefgh xyz " * 20], 300)


@pytest.fixture(scope="module")
def letters(tok) -> dict[str, int]:
    return {ch: tok.encode(ch)[0] for ch in "abcdx"}


@pytest.fixture(scope="module")
def model(tok, letters) -> GPT:
    t = letters
    # after x: a is likelier than b; after a anything goes (a flat distribution), after b c is near certain,
    # and after c the document ends (<|bos|>, the completions' end)
    return scripted_model(tok, {t["x"]: {t["a"]: 3.0, t["b"]: 2.5}, t["b"]: {t["c"]: 9.0},
                                t["c"]: {tok.get_bos_token_id(): 9.0}, t["a"]: {}})


@pytest.fixture(scope="module")
def engine(model, tok):
    engine = AsyncEngine(LLMEngine(model, tok, num_blocks=64, block_size=4, max_num_seqs=8,
                                   max_num_batched_tokens=64), max_queue=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http(engine, tok):
    with serve(create_app(engine, tok, model_name=MODEL)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def log_softmax(model: GPT, tok: Tokenizer, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0, -1].float().log_softmax(-1)


def beams(http: httpx.Client, tok: Tokenizer, **body) -> dict:
    prompt = [tok.get_bos_token_id(), tok.encode("x")[0]]
    r = http.post("/v1/completions", json={"prompt": prompt, "use_beam_search": True, "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_one_beam_is_greedy_and_two_find_the_likelier_whole(http, model, tok, letters):
    prompt = [tok.get_bos_token_id(), letters["x"]]
    first = log_softmax(model, tok, prompt)
    assert first[letters["a"]] > first[letters["b"]]  # greedy decoding takes a
    greedy = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
    one = beams(http, tok, n=1)["choices"]
    assert greedy["choices"][0]["text"].startswith("a") and [c["text"] for c in one] == [greedy["choices"][0]["text"]]
    two = beams(http, tok, n=2)
    best, other = two["choices"]
    assert (best["index"], best["text"], best["finish_reason"]) == (0, "bc", "stop")  # the end token not shown
    assert other["index"] == 1 and other["text"] != "bc"
    assert two["usage"]["completion_tokens"] == 3 + 4  # "bc" and its end; the other cut at max_tokens
    assert other["finish_reason"] == "length"


def test_a_strong_length_penalty_favours_the_longer_beam(http, tok):
    """Scores are sums over length ** penalty: with a large penalty the 4-token beam wins over the 3-token one."""
    choices = beams(http, tok, n=2, length_penalty=8.0)["choices"]
    assert [c["finish_reason"] for c in choices] == ["length", "length"]  # "bc" and its end fell behind
    assert beams(http, tok, n=2, length_penalty=1.0)["choices"][0]["text"] == "bc"


def test_each_prompt_of_a_list_gets_its_beams_and_nothing_is_left_in_the_engine(http, engine, tok, letters):
    alone = beams(http, tok, n=2)["choices"]
    prompts = [[tok.get_bos_token_id(), letters["x"]], [tok.get_bos_token_id(), letters["b"]]]
    both = http.post("/v1/completions", json={"prompt": prompts, "use_beam_search": True, "max_tokens": 4,
                                              "n": 2}).json()["choices"]
    assert [c["index"] for c in both] == [0, 1, 2, 3]
    assert [c["text"] for c in both[:2]] == [c["text"] for c in alone] and both[2]["text"] == "c"
    assert wait_until(lambda: all_blocks_free(engine))


@pytest.mark.parametrize("field, value", [("stream", True), ("temperature", 0.5), ("logprobs", 1), ("echo", True),
                                          ("stop", ["x"]), ("seed", 1), ("response_format", {"type": "json_object"})])
def test_what_beam_search_has_no_use_for_is_a_400_naming_it(http, tok, field, value):
    body = {"prompt": "x", "use_beam_search": True, "n": 2, "max_tokens": 2, field: value}
    assert_error(http.post("/v1/completions", json=body), 400, field)


def test_a_chat_asking_for_beam_search_is_told_where_it_is(http):
    body = {"messages": [{"role": "user", "content": "x"}], "use_beam_search": True}
    assert "/v1/completions" in assert_error(http.post("/v1/chat/completions", json=body), 400, "use_beam_search")[
        "message"]
