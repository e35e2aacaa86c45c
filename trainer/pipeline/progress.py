"""
A progress bar on the driver for a job that runs in Ray Train workers.

Rank 0 sends (step, total, metrics) to a small named actor; a thread on the driver polls it and draws a
tqdm bar with ETA. Losing an update costs nothing: the next one carries the full state.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import ray
from tqdm import tqdm


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: tuple[int, int, dict[str, float]] = (0, 0, {})

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.state = (step, total, metrics)

    def get(self) -> tuple[int, int, dict[str, float]]:
        return self.state


class ProgressBar:
    """Context manager: creates the board actor and draws its state until the job ends."""

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        # in a log file (no terminal) a bar line every few seconds is plenty, and polling the board faster than
        # the bar redraws would only take CPU from the training workers on a small machine
        self.interval_s = 0.5 if sys.stderr.isatty() else 10.0
        self._stop = threading.Event()

    def __enter__(self) -> ProgressBar:
        self.board = ProgressBoard.options(name=self.name, get_if_exists=False).remote()
        self.bar = tqdm(desc=self.description, unit="step", dynamic_ncols=True, mininterval=self.interval_s)
        self._thread = threading.Thread(target=self._draw, daemon=True)
        self._thread.start()
        return self

    def _draw(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._refresh()

    def _refresh(self) -> None:
        try:
            step, total, metrics = ray.get(self.board.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a missed refresh only delays the bar
            return
        self._render(step, total, metrics)

    def _render(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "val_bpb", "tokens_per_second") if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(0)  # redraws, honouring mininterval

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._refresh()  # the bar's last line shows where the job ended, not the last poll
        self.bar.close()
        ray.kill(self.board)
