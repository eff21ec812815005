"""The threads reward calls run in: `RewardWorker` (a function with a timeout) and `AsyncRewardWorker` (an event
loop for an ``async def`` function)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any

__all__ = ["AsyncRewardWorker", "RewardWorker"]


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


class AsyncRewardWorker:
    """A daemon thread running one asyncio event loop, kept for all the calls of one ``async def`` reward.

    One loop for the function's whole life (not one per call), as TRL keeps one: clients, locks and semaphores
    the function creates at module level bind to the loop they are first used on and fail on another. The loop
    runs in its own thread, so scoring works the same when the training thread already runs a loop (a notebook).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self._serve, name=f"lit_entropy-reward-{name}-loop", daemon=True
        )
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # retired: what is still running is cancelled, as asyncio.run does at its end
            with contextlib.suppress(Exception):
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future:
        """Runs ``coroutine`` on the loop; its result (or exception) arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def retire(self) -> None:
        """The loop stops once it gets control back (at once when idle); it takes no further calls."""
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
