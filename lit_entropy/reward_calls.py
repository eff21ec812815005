"""Running one reward function's calls (`CallRunner`), counting their outcomes in one scoring call (`Tally`), and
the coroutines that run ``async def`` rewards.

An ``async def`` reward runs on its function's event loop (`lit_entropy.reward_worker.AsyncRewardWorker`): the
per-completion form as one task per completion, all at once (``asyncio.gather``), the batched form as one task.
With a ``timeout`` each task has that many seconds and is cancelled past them (a coroutine that blocks the loop
without awaiting cannot be cancelled: `CallRunner.run_async` then gives up on the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from lit_entropy.errors import LitEntropyError
from lit_entropy.reward_forms import batched_arguments, batched_values, is_async, reward_value
from lit_entropy.reward_process import RewardCallTimedOut, RewardProcess
from lit_entropy.reward_worker import AsyncRewardWorker, RewardWorker

__all__ = [
    "CallRunner",
    "CallTimedOut",
    "RewardTimeoutError",
    "Tally",
    "call_async",
    "each_async",
    "is_stop_request",
]


class CallTimedOut(Exception):
    """A call with a timeout overran it (distinguished from a function raising TimeoutError)."""


def is_stop_request(error: BaseException) -> bool:
    """``KeyboardInterrupt`` and ``SystemExit`` subclasses (Lightning's ``SIGTERMException``): they stop the run
    instead of failing one completion. A plain ``SystemExit`` (``sys.exit`` in a verifier) is a failure."""
    return isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and type(error) is not SystemExit
    )


@dataclass
class Tally:
    """One function's values over the N completions of one scoring call, with its failures and skips.

    Attributes:
        on_error: The value a failed completion scores.
        values: One value per completion scored so far (``on_error`` where it failed, 0.0 where skipped).
        skipped: One flag per completion: True where the function returned ``None`` (batched form).
        num_errors: Failed completions (timeouts included).
        num_timeouts: Completions whose call overran its timeout.
        first_error: The first failure's exception (a `TimeoutError` for a timeout).
    """

    on_error: float
    values: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    num_errors: int = 0
    num_timeouts: int = 0
    first_error: BaseException | None = None

    def score(self, value: Any, allow_none: bool = False) -> None:
        """Adds a returned value: a finite number, ``None`` (a skip, when ``allow_none``), else a failure."""
        if value is None and allow_none:
            self.values.append(0.0)
            self.skipped.append(True)
            return
        try:
            converted = reward_value(value)
        except (TypeError, ValueError) as error:
            self.fail(error)
            return
        self.values.append(converted)
        self.skipped.append(False)

    def fail(self, error: BaseException, count: int = 1) -> None:
        """Adds ``count`` failed completions (a raised error, a bad value, or a `CallTimedOut`)."""
        if isinstance(error, CallTimedOut):
            self.num_timeouts += count
            error = TimeoutError(str(error))
        self.values.extend([self.on_error] * count)
        self.skipped.extend([False] * count)
        self.num_errors += count
        if self.first_error is None:
            self.first_error = error

    def outcome(self, outcome: tuple[str, Any], allow_none: bool = False) -> None:
        """Adds one ``("ok", value)`` / ``("error", exception)`` / ``("timeout", message)`` from the coroutines
        below; a stop request (`is_stop_request`) is raised here, in the scoring thread."""
        kind, value = outcome
        if kind == "ok":
            self.score(value, allow_none)
        elif kind == "timeout":
            self.fail(CallTimedOut(value))
        elif is_stop_request(value):
            raise value
        else:
            self.fail(value)


async def _guarded(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], timeout: float | None
) -> tuple[str, Any]:
    """Awaits one call in the current task, cancelled at ``timeout``; every outcome, ``KeyboardInterrupt``
    included, comes back as a value. (In a task of its own, a ``KeyboardInterrupt`` would escape into the loop,
    end its thread and leave the scoring thread waiting.)"""
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        if task is not None:
            task.cancel()

    deadline = None if timeout is None else asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return ("ok", await function(*args, **kwargs))
    except asyncio.CancelledError:
        if not expired:
            raise
        return ("timeout", f"call did not return within timeout={timeout}s")
    except BaseException as error:  # noqa: BLE001 - handed to the scoring thread, which decides
        return ("error", error)
    finally:
        if deadline is not None:
            deadline.cancel()


async def each_async(
    function: Callable[..., Any],
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    kwargs: Mapping[str, Any],
    timeout: float | None,
) -> list[tuple[str, Any]]:
    """The per-completion form of an ``async def`` reward: every completion's call at once, outcomes in order."""
    calls = [
        _guarded(function, (completion, example), kwargs, timeout)
        for completion, example in zip(completions, examples)
    ]
    return list(await asyncio.gather(*calls))


async def call_async(
    function: Callable[..., Any], arguments: Mapping[str, Any], timeout: float | None
) -> tuple[str, Any]:
    """One batched call of an ``async def`` reward, its outcome as in `each_async`."""
    return await _guarded(function, (), arguments, timeout)


class RewardTimeoutError(LitEntropyError, RuntimeError):
    """Too many calls of one reward function are stuck past their timeout (their threads cannot be killed)."""


class CallRunner:
    """Where one reward function's calls run: directly in the scoring thread (no ``timeout``), in a worker
    thread (``timeout``), on an event loop (``async def``), or in a child process (``process: true``).

    Args:
        reward: The function's config entry (`lit_entropy.reward_spec.Reward`, already checked).
        function: The resolved function.
        name: Its metric name, for messages and thread names.
        form: ``"batched"`` or ``"per_completion"`` (`lit_entropy.reward_forms.detect_form`).
        max_abandoned: How many overrun calls (threads or loops) may still be running before
            `RewardTimeoutError`.
    """

    def __init__(
        self, reward: Any, function: Callable[..., Any], name: str, form: str, max_abandoned: int
    ) -> None:
        self.reward = reward
        self.function = function
        self.name = name
        self.form = form
        self.is_async = is_async(function)
        self.max_abandoned = max_abandoned
        self.worker: RewardWorker | None = None
        self.loop: AsyncRewardWorker | None = None
        self.process: RewardProcess | None = None
        self.abandoned: list[RewardWorker | AsyncRewardWorker] = []

    def score_each(
        self,
        tally: Tally,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        allowed: float | None,
    ) -> None:
        """The per-completion form: one call per completion into ``tally``; stops early once more than
        ``allowed`` completions failed (None: never). An ``async def`` function's calls run all at once."""
        if self.is_async and not self.reward.process:
            try:
                outcomes = self.run_async(
                    each_async(self.function, completions, examples, self.reward.kwargs, self.reward.timeout)
                )
            except CallTimedOut as exc:
                tally.fail(exc, len(completions))
                return
            for outcome in outcomes:
                tally.outcome(outcome)
            return
        for completion, example in zip(completions, examples):
            if allowed is not None and tally.num_errors > allowed:
                return
            try:
                value = self.call((completion, example), self.reward.kwargs)
            except RewardTimeoutError:
                raise
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - one bad completion must not stop the iteration
                if is_stop_request(exc):
                    raise  # Lightning's SIGTERMException and the like: a stop request, not a failure
                tally.fail(exc)
            else:
                tally.score(value)

    def score_batched(
        self,
        tally: Tally,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        prompts: Sequence[Any] | None,
        completion_ids: Sequence[Sequence[int]] | None,
    ) -> None:
        """The batched form: one call for every completion into ``tally``; if it fails, every completion
        failed (``None`` values are skips)."""
        try:
            arguments = batched_arguments(completions, examples, prompts, completion_ids, self.reward.kwargs)
            if self.is_async and not self.reward.process:
                kind, result = self.run_async(call_async(self.function, arguments, self.reward.timeout))
                if kind == "timeout":
                    raise CallTimedOut(result)
                if kind == "error":
                    raise result
            else:
                result = self.call((), arguments)
            values = batched_values(result, len(completions))
        except RewardTimeoutError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - counted as a failure of every completion
            if is_stop_request(exc):
                raise
            tally.fail(exc, len(completions))
            return
        for value in values:
            tally.score(value, allow_none=True)

    def call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """``function(*args, **kwargs)`` where this function's calls run (all but the event loop).

        Raises:
            CallTimedOut: The call overran ``timeout`` (abandoned in its thread, or its child killed).
            RewardTimeoutError: More than ``max_abandoned`` overrun calls are still running.
            BaseException: What the function raised.
        """
        if self.reward.process:
            return self._in_process(args, kwargs)
        if self.reward.timeout is None:
            return self.function(*args, **kwargs)
        return self._in_thread(args, kwargs)

    def _in_process(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.process is None:
            self.process = RewardProcess(self.reward.fn, self.name)
        portable = tuple(dict(arg) if isinstance(arg, Mapping) else arg for arg in args)  # picklable rows
        try:
            return self.process.invoke(portable, dict(kwargs), self.reward.timeout)
        except RewardCallTimedOut as exc:
            raise CallTimedOut(str(exc)) from exc

    def _still_running(self) -> list[RewardWorker | AsyncRewardWorker]:
        self.abandoned = [worker for worker in self.abandoned if worker.thread.is_alive()]
        if len(self.abandoned) >= self.max_abandoned:
            raise RewardTimeoutError(
                f"reward {self.name!r} ({self.reward.fn}) hung past its timeout={self.reward.timeout}s "
                f"{len(self.abandoned)} times and those calls are still running (max_abandoned="
                f"{self.max_abandoned}); threads cannot be killed: fix the function, raise its timeout, or set "
                "process: true on it (a timed-out call is then killed)"
            )
        return self.abandoned

    def _in_thread(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """One call in the worker thread; the worker is abandoned when the call overruns."""
        stuck = self._still_running()
        if self.worker is None or not self.worker.thread.is_alive():
            self.worker = RewardWorker(self.name)
        worker = self.worker
        future = worker.submit(self.function, *args, **kwargs)
        try:
            return future.result(timeout=self.reward.timeout)
        except FutureTimeout as exc:  # the builtin TimeoutError on Python >= 3.11, its own class on 3.10
            if future.done():  # it finished in the instant between the timeout and here; use its result
                return future.result()
            worker.retire()
            self.worker = None
            stuck.append(worker)
            raise CallTimedOut(f"call did not return within timeout={self.reward.timeout}s") from exc

    def run_async(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Runs a coroutine of this module (`each_async`, `call_async`) on the function's event loop.

        Timeouts are enforced inside the loop; a loop still busy at ``2 * timeout + 1`` seconds is blocked (a
        coroutine that does not await): it is abandoned and `CallTimedOut` raised.
        """
        try:
            stuck = self._still_running()
        except RewardTimeoutError:
            coroutine.close()  # never started: no "was never awaited" warning
            raise
        if self.loop is None or not self.loop.thread.is_alive():
            self.loop = AsyncRewardWorker(self.name)
        loop = self.loop
        future = loop.submit(coroutine)
        timeout = self.reward.timeout
        limit = None if timeout is None else 2 * timeout + 1.0
        try:
            return future.result(timeout=limit)
        except FutureTimeout as exc:
            if future.done():
                return future.result()
            future.cancel()
            loop.retire()
            self.loop = None
            stuck.append(loop)
            raise CallTimedOut(
                f"the event loop was still busy {limit:g}s after the call started (2 x timeout + 1s): a "
                "coroutine blocks it without awaiting"
            ) from exc

    def close(self) -> None:
        """Retires the worker thread and the event loop (idle ones exit now, abandoned ones when their call
        returns) and kills the child process."""
        for worker in (self.worker, self.loop):
            if worker is not None:
                worker.retire()
        self.worker = self.loop = None
        if self.process is not None:
            self.process.close()
            self.process = None

    def __getstate__(self) -> dict[str, Any]:
        # Threads and processes cannot be pickled or deep-copied (ddp_spawn, copy.deepcopy of the module): a
        # copy starts without them and creates its own on first use.
        state = self.__dict__.copy()
        state.update(worker=None, loop=None, process=None, abandoned=[])
        return state
