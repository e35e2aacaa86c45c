"""Distributed tests on one machine: a few real ranks in spawned processes (gloo on CPU), so that a test can
check what the ranks compute together against what one process computes alone."""

import multiprocessing as mp
from collections.abc import Callable


def run_ranks(target: Callable[..., None], args: tuple, world: int = 2, timeout: float = 120) -> None:
    """target(rank, world, *args) in `world` spawned processes; each must exit 0 within timeout seconds.
    Spawned (a fresh interpreter per rank), so target must be a module-level function; it reports its
    results through files that args name."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        assert p.exitcode == 0
