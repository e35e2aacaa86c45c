"""
A Ray Serve request router for the engine replicas that keeps prefix caches warm: a request goes to the
replica that last ran the longest block-aligned prefix of its prompt, so requests sharing a system prompt or
a conversation's history find its KV blocks cached, instead of ~1/N of them with N replicas routed at random.

Notable:
- the prompt's token ids are the request's second argument (EngineReplica.generate(request_id, prompt_ids,
  params)); prefixes are hashed in whole KV blocks (serve.block_size), the unit the engine's prefix cache
  shares, with the block manager's own chain hash
- the replica holding the longest known prefix comes first; a prompt with no known prefix goes first to
  the replica that owns the fewest blocks, so new prefixes spread over the replicas' caches; if that one is
  full (its max_ongoing_requests) the request goes to the less loaded of two other replicas, as Serve's
  default power-of-two-choices router does. After routing, the prompt's block hashes name the replica
  that ran it (the newest owner wins)
- requests are handed replicas in arrival order (Serve's FIFOMixin, as its default router): a replica
  chosen for one request's prefix goes to the oldest request waiting, which is that request unless several
  wait at once. Without it, a request whose routing task lost a race to another request's (both routed at
  once, e.g. a generate beside a model_info call) was never handed a replica in Ray 2.60
- the table is this router's own (one per process that holds a handle: the API ingress replica), bounded
  to MAX_ENTRIES block hashes, least recently used dropped first; a replica that died or was replaced is
  skipped, and its entries go as they are overwritten or age out
- Ray Serve 2.60 also ships PrefixCacheAffinityRouter (ray.serve.llm): it matches prompt text kept in a
  detached actor it calls with blocking ray.get from the routing loop, and reads `prompt`/`messages`
  attributes our requests do not have; this one matches token ids in-process
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from serving.engine.block_manager import chain_hash

MAX_ENTRIES = 200_000  # block hashes remembered (a few MB), least recently used dropped first


def block_hashes(prompt_ids: list[int], block_size: int) -> list[bytes]:
    """One hash per whole block of the prompt, each covering every token up to the end of its block."""
    hashes: list[bytes] = []
    for end in range(block_size, len(prompt_ids) + 1, block_size):
        hashes.append(chain_hash(hashes[-1] if hashes else None, prompt_ids[end - block_size : end]))
    return hashes


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes a request to the replica that last ran the longest prefix of its prompt, else by two choices."""

    def initialize_state(self, block_size: int = 16, **_: Any) -> None:
        self.block_size = block_size
        self.owners: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self.owned: Counter[ReplicaID] = Counter()  # blocks each replica owns in self.owners

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranked groups: the prefix's owner alone (without one: the candidate owning the fewest blocks),
        then two random others."""
        if pending_request is not None:
            # every replica is a candidate each time: when none can take the request, Serve's loop must
            # back off before asking again (it spins without awaiting otherwise, starving its event loop)
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        first = self._owner(pending_request, by_id)
        if first is None and block_hashes(_prompt_ids(pending_request), self.block_size):
            # a new prefix: to the replica whose cache the router has filled least
            first = min(by_id, key=lambda replica_id: self.owned[replica_id])
        others = [replica for replica in candidate_replicas if replica.replica_id != first]
        ranks = [[by_id[first]]] if first is not None else []
        if others:
            ranks.append(random.sample(others, min(2, len(others))))
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for h in block_hashes(_prompt_ids(pending_request), self.block_size):
            previous = self.owners.get(h)
            if previous is not None:
                self.owned[previous] -= 1
            self.owners[h] = replica_id
            self.owners.move_to_end(h)
            self.owned[replica_id] += 1
        while len(self.owners) > MAX_ENTRIES:
            _, dropped = self.owners.popitem(last=False)
            self.owned[dropped] -= 1

    def _owner(self, pending_request: PendingRequest | None, candidates: dict[ReplicaID, RunningReplica]
               ) -> ReplicaID | None:
        """The candidate that last ran the longest block-aligned prefix of the request's prompt."""
        for h in reversed(block_hashes(_prompt_ids(pending_request), self.block_size)):
            owner = self.owners.get(h)
            if owner is not None and owner in candidates:
                return owner
        return None


def _prompt_ids(pending_request: PendingRequest | None) -> list[int]:
    """The prompt of an EngineReplica.generate call; nothing for other methods (model_info, stats)."""
    if pending_request is None or len(pending_request.args) < 2 or not isinstance(pending_request.args[1], list):
        return []
    return pending_request.args[1]
