"""The chat stages' data loader (trainer/data/conversations.py): conversations packed into rows, the loss
only on assistant tokens, each rank its own conversations, and a cursor that resumes to the exact batch."""

import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from trainer.data.conversations import ConversationLoader
from trainer.tasks.base import Task

MAX_LEN = 48
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(["abcdefghij 0123456789"], 256 + len(SPECIAL_TOKENS))


class Chats(Task):
    """Conversation i: a question of i % 7 + 1 letters and an answer of i % 5 + 1 digits."""

    name = "chats"

    def __init__(self, n: int = 40, long_every: int = 0):
        self.n, self.long_every = n, long_every

    def __len__(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        question = "q" * (index % 7 + 1)
        if self.long_every and index % self.long_every == 0:
            question = "x" * 3 * MAX_LEN  # longer than a row
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "7" * (index % 5 + 1)}]}


def loader(tok, task, rank=0, world=1, batch=2, state=None, loop=True) -> ConversationLoader:
    return ConversationLoader(task, tok, batch, MAX_LEN, rank, world, CPU, state=state, loop=loop)


def rendered(tok, task, index) -> list[int]:
    return tok.render_conversation(task[index], max_tokens=MAX_LEN + 1)[0]


def packed_rows(tok, task, indices: list[int], rows: int) -> tuple[list[list[int]], list[list[int]], int]:
    """The packing by hand: ids and masks of `rows` rows filled in order from indices; how many it took."""
    ids_rows, mask_rows, used = [[]], [[]], 0
    for index in indices:
        ids, mask = tok.render_conversation(task[index], max_tokens=MAX_LEN + 1)
        if len(ids_rows[-1]) + len(ids) > MAX_LEN + 1:
            if len(ids_rows) == rows:
                break
            ids_rows.append([])
            mask_rows.append([])
        ids_rows[-1] += ids
        mask_rows[-1] += mask
        used += 1
    return ids_rows, mask_rows, used


def test_rows_hold_whole_conversations_in_order_and_train_only_on_assistant_tokens(tok):
    task = Chats()
    inputs, targets = next(loader(tok, task))
    ids_rows, mask_rows, used = packed_rows(tok, task, list(range(len(task))), rows=2)
    assert used > 2  # packed: more conversations than rows
    assert inputs.shape == (2, max(len(row) for row in ids_rows) - 1)
    for i, (ids, mask) in enumerate(zip(ids_rows, mask_rows)):
        n = len(ids) - 1
        assert inputs[i, :n].tolist() == ids[:-1]
        # the next token where it is an assistant token (answers and <|assistant_end|>), else -1
        assert targets[i, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (inputs[i, n:] == tok.get_bos_token_id()).all() and (targets[i, n:] == -1).all()  # padding
    trained = targets[targets >= 0].tolist()
    assert trained[:2] == [tok.encode("7")[0], tok.encode_special("<|assistant_end|>")]
    assert tok.get_bos_token_id() not in trained  # a conversation never learns to predict the next one


def test_a_conversation_that_does_not_fit_opens_the_next_batch(tok):
    task = Chats()
    stream = loader(tok, task, batch=1)
    next(stream)
    _, _, used = packed_rows(tok, task, list(range(len(task))), rows=1)
    assert stream.state_dict() == {"index": used + 1, "epoch": 0, "carry": used}
    inputs, _ = next(stream)
    assert inputs[0, : len(rendered(tok, task, used))].tolist() == rendered(tok, task, used)


def test_resuming_from_the_cursor_gives_the_same_batches(tok):
    task = Chats(n=23)
    uninterrupted = loader(tok, task, batch=3)
    batches = [next(uninterrupted) for _ in range(12)]  # more than one epoch, conversations carried over
    interrupted = loader(tok, task, batch=3)
    for _ in range(5):
        next(interrupted)
    resumed = loader(tok, task, batch=3, state=interrupted.state_dict())
    for want in batches[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.state_dict()["epoch"] >= 1


def test_ranks_take_alternate_conversations(tok):
    task = Chats(n=8)
    for rank in range(2):
        inputs, _ = next(loader(tok, task, rank=rank, world=2, batch=1, loop=False))
        ids, _, used = packed_rows(tok, task, list(range(rank, 8, 2)), rows=1)
        assert used >= 2 and inputs[0].tolist() == ids[0][:-1]


def test_one_pass_ends_with_a_partial_batch(tok):
    task = Chats(n=5)
    batches = list(loader(tok, task, batch=4, loop=False))
    ids_rows, _, used = packed_rows(tok, task, list(range(5)), rows=4)
    assert used == 5 and len(ids_rows) < 4  # five short conversations fill fewer than four rows
    assert len(batches) == 1 and batches[0][0].shape[0] == len(ids_rows)


def test_a_conversation_longer_than_a_row_is_cut_to_it(tok):
    task = Chats(n=3, long_every=2)  # conversations 0 and 2 are longer than a row, 1 is short
    batches = list(loader(tok, task, batch=1, loop=False))
    assert len(batches) == 3
    assert batches[0][0][0].tolist() == rendered(tok, task, 0)[:-1] and len(rendered(tok, task, 0)) == MAX_LEN + 1
    assert batches[1][0].shape[1] < MAX_LEN and batches[2][0].shape[1] == MAX_LEN
