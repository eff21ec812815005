"""`RewardWorker`: the thread that runs a reward function's calls when the function has a timeout."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["RewardWorker"]


class RewardWorker:
    """A daemon thread that runs one reward function's calls one at a time, for calls with a timeout.

    A daemon thread does not keep the interpreter alive at exit, unlike ``concurrent.futures``' pool threads,
    which are joined at exit and would make a hung reward hang the process's exit too.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._serve, name=f"lit_entropy-reward-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # retired: abandoned after a timeout, or the scorer was closed
                return
            future, function, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the scoring thread, which decides
                future.set_exception(exc)

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, function, args, kwargs))
        return future

    def retire(self) -> None:
        """The thread exits once its current call (if any) returns; it takes no further calls."""
        self._jobs.put(None)
