"""`RewardScorer`: the weighted sum of reward functions, with per-completion failure isolation and timeouts.

Timeouts: ``timeout: 5.0`` on a reward (seconds, per completion) runs that function's calls in a worker thread
and scores a call that has not returned in time ``on_error`` (counted in ``RewardResult.num_timeouts`` and in
``num_errors``). Python cannot kill a thread, so the stuck call is *abandoned*: its daemon thread keeps running
until the call returns (or the process exits) and a fresh worker serves the next completion. More than
``max_abandoned`` (default 8) abandoned calls of one function still running at once raise `RewardTimeoutError`:
such a function needs fixing, or ``process: true`` (its calls are killed at the timeout). Without ``timeout`` (the default)
the function is called directly in the training thread, exactly as before.

Systematic failures stop the run: a function that fails on every completion of one scoring call (a wrong
signature, a field the rows lack, a wrong return type), or on more than ``max_error_fraction`` of them, raises
`RewardFailureError` naming the function, the count and the first exception, instead of training on
``on_error``. Failures on fewer completions are counted and the run goes on.

What a reward may raise: any ``Exception``, and ``SystemExit`` (``sys.exit(3)`` inside a verifier), is a failure
of that completion. ``KeyboardInterrupt`` (and Lightning's ``SIGTERMException``, a subclass of ``SystemExit``)
propagate: they are requests to stop the run, not failures of one completion. ``os._exit`` and signals that kill
the process cannot be caught in the process they happen in: a reward with ``process: true`` runs in a child
process (`lit_entropy.reward_process`), where they, ``KeyboardInterrupt`` and crashes fail that call only and a
timeout kills the call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError, LitEntropyError, one_line
from lit_entropy.reward_process import RewardCallTimedOut, RewardProcess
from lit_entropy.reward_spec import Reward, resolve_reward_function
from lit_entropy.reward_worker import RewardWorker

__all__ = [
    "RewardFailureError",
    "RewardResult",
    "RewardScorer",
    "RewardTimeoutError",
]

log = logging.getLogger(__name__)


@dataclass
class RewardResult:
    """Rewards of N completions.

    Attributes:
        total: ``[N]`` float32, weighted sum over functions.
        per_function: Name -> ``[N]`` float32 unweighted values (``on_error`` where the function failed).
        num_errors: Failed (function, completion) calls, summed over functions: raised, returned a
            non-numeric / non-finite value, or timed out.
        errors_per_function: Name -> failed calls of that function (timeouts included).
        num_timeouts: The failed calls that were cut by their function's ``timeout`` (included in
            ``num_errors``).
        timeouts_per_function: Name -> timed-out calls of that function.
        first_errors: Name -> the first exception of that function in this call (a `TimeoutError` for a
            timeout); functions without failures are absent.
    """

    total: Tensor
    per_function: dict[str, Tensor]
    num_errors: int
    errors_per_function: dict[str, int]
    num_timeouts: int = 0
    timeouts_per_function: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, BaseException] = field(default_factory=dict)


class RewardTimeoutError(LitEntropyError, RuntimeError):
    """Too many calls of one reward function are stuck past their timeout (their threads cannot be killed)."""


class RewardFailureError(LitEntropyError, RuntimeError):
    """A reward function failed on every completion of one scoring call, or on more than its allowed share.

    Such a function is broken, not unlucky: training on its ``on_error`` value would learn nothing from it.
    """


def _as_float(value: Any) -> float:
    # 1-element tensors are common in user reward functions; anything else non-numeric is an error.
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"returned {type(value).__name__} {value!r}, expected a float")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"returned non-finite {result}")
    return result


class RewardScorer:
    """Scores completions with a weighted sum of reward functions, isolating failures per completion.

    Args:
        rewards: The functions; every import path is resolved here, so a bad config fails before training.
            Plain mappings with ``Reward``'s fields are accepted too.
        on_error: Value a function contributes for a completion on which it raised, returned a
            non-finite / non-numeric value, or exceeded its ``timeout``.
        max_abandoned: How many timed-out calls of one function may still be running (abandoned in their
            threads) before scoring raises `RewardTimeoutError` instead of starting yet another thread.
        max_error_fraction: In ``[0, 1]``. A scoring call raises `RewardFailureError` when one function fails
            on more than this share of its completions; a function failing on *every* completion always
            raises. 1.0 (default): only a function failing on every completion stops the run; 0.5: more than
            half; 0.0: any failure. Failures (raised, non-numeric or non-finite result, timeout) below the
            share are scored ``on_error`` and counted. ``None``: never raise, count every failure (a
            function failing on every completion then trains on ``on_error``: opt in knowingly).

    Raises:
        ConfigError: Empty ``rewards``, a path that does not resolve (naming it), a non-finite weight, a
            timeout that is not a positive number of seconds, two functions with the same metric name, or a
            ``max_error_fraction`` outside ``[0, 1]``.
    """

    def __init__(
        self,
        rewards: Sequence[Reward | Mapping[str, Any]],
        on_error: float = 0.0,
        max_abandoned: int = 8,
        max_error_fraction: float | None = 1.0,
    ) -> None:
        if isinstance(rewards, (str, bytes, Mapping)) or not isinstance(rewards, Sequence):
            raise ConfigError(
                f"rewards must be a list of reward entries ({{fn, weight, ...}}), got {type(rewards).__name__}"
            )
        if not rewards:
            raise ConfigError("rewards is empty: configure at least one reward function")
        if not _is_real(on_error) or not math.isfinite(on_error):
            raise ConfigError(f"reward_on_error must be a finite number, got {on_error!r}")
        if isinstance(max_abandoned, bool) or not isinstance(max_abandoned, int) or max_abandoned < 1:
            raise ConfigError(f"max_abandoned must be an integer >= 1, got {max_abandoned!r}")
        if max_error_fraction is not None and (
            not _is_real(max_error_fraction) or not 0.0 <= max_error_fraction <= 1.0
        ):
            raise ConfigError(
                f"max_error_fraction must be a number in [0, 1] or null, got {max_error_fraction!r}"
            )
        self.on_error = float(on_error)
        self.max_abandoned = max_abandoned
        self.max_error_fraction = None if max_error_fraction is None else float(max_error_fraction)
        self._workers: dict[str, RewardWorker] = {}
        self._processes: dict[str, RewardProcess] = {}
        self._abandoned: dict[str, list[RewardWorker]] = {}
        self.rewards: list[Reward] = []
        self._functions: list[Callable[..., Any]] = []
        self._names: list[str] = []
        for index, reward in enumerate(rewards):
            if isinstance(reward, Mapping):
                try:
                    reward = Reward(**reward)
                except TypeError as exc:
                    raise ConfigError(f"rewards[{index}]: {exc}") from exc
            if not isinstance(reward, Reward):
                raise ConfigError(f"rewards[{index}] must be a Reward, got {type(reward).__name__}")
            try:
                function = resolve_reward_function(reward.fn)
            except ConfigError as exc:
                raise ConfigError(f"rewards[{index}].fn: {exc}") from exc.__cause__
            if not _is_real(reward.weight) or not math.isfinite(reward.weight):
                raise ConfigError(
                    f"rewards[{index}] ({reward.fn!r}): weight must be a finite number, got {reward.weight!r}"
                )
            timeout = reward.timeout
            if timeout is not None and (not _is_real(timeout) or not math.isfinite(timeout) or timeout <= 0):
                raise ConfigError(
                    f"rewards[{index}] ({reward.fn!r}): timeout must be a positive number of seconds or null, "
                    f"got {timeout!r}"
                )
            if not isinstance(reward.process, bool):
                raise ConfigError(
                    f"rewards[{index}] ({reward.fn!r}): process must be true or false, got {reward.process!r}"
                )
            if not isinstance(reward.kwargs, Mapping):
                raise ConfigError(
                    f"rewards[{index}] ({reward.fn!r}): kwargs must be a mapping, got {type(reward.kwargs).__name__}"
                )
            # functools.partial and callable instances have no __name__: fall back to the path's last part.
            name = reward.name or getattr(function, "__name__", None) or re.split(r"[.:]", reward.fn)[-1]
            if name in self._names:
                raise ConfigError(
                    f"duplicate reward name {name!r} (from {reward.fn!r}); set a distinct `name` for each"
                )
            self.rewards.append(reward)
            self._functions.append(function)
            self._names.append(name)

    @property
    def names(self) -> list[str]:
        """Metric names of the functions, in config order."""
        return list(self._names)

    def __call__(
        self,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        *,
        check_failures: bool = True,
    ) -> RewardResult:
        """Scores each completion against its dataset row.

        Args:
            completions: N completion texts.
            examples: N dataset rows, ``examples[i]`` being the row ``completions[i]`` answers (a prompt's
                row repeated G times for its G completions).
            check_failures: Raise `RewardFailureError` for a function failing on every completion or on more
                than ``max_error_fraction`` of them (unless that is ``None``). ``False`` only counts, e.g. for
                a probe that inspects ``first_errors`` itself.

        Returns:
            The weighted total ``[N]`` and per-function values, with error and timeout counts. The first
            failure of each function in this call is logged as a warning with the exception.

        Raises:
            RewardTimeoutError: A function has more than ``max_abandoned`` timed-out calls still running.
            RewardFailureError: With ``check_failures``, a function failed on every completion, or on more
                than ``max_error_fraction`` of them (raised as soon as that share is exceeded).
            KeyboardInterrupt: Raised by a function (or Ctrl-C while it runs): the run stops.
        """
        if len(completions) != len(examples):
            raise ValueError(
                f"got {len(completions)} completions but {len(examples)} examples; "
                "pass one row per completion"
            )
        total = torch.zeros(len(completions), dtype=torch.float64)
        per_function: dict[str, Tensor] = {}
        errors_per_function: dict[str, int] = {}
        timeouts_per_function: dict[str, int] = {}
        first_errors: dict[str, BaseException] = {}
        for reward, function, name in zip(self.rewards, self._functions, self._names):
            values: list[float] = []
            first_error: BaseException | None = None
            num_errors = num_timeouts = 0
            check = check_failures and self.max_error_fraction is not None
            allowed = len(completions) * (self.max_error_fraction or 0.0)
            for completion, example in zip(completions, examples):
                if check and num_errors > allowed:
                    raise self._failure(name, reward, num_errors, len(values), len(completions), first_error)
                try:
                    if reward.process:
                        worker = self._processes.get(name) or self._processes.setdefault(
                            name, RewardProcess(reward.fn, name)
                        )
                        try:
                            value = worker.call(
                                completion, dict(example), dict(reward.kwargs), reward.timeout
                            )
                        except RewardCallTimedOut as exc:
                            raise _CallTimedOut(str(exc)) from exc
                    elif reward.timeout is None:
                        value = function(completion, example, **reward.kwargs)
                    else:
                        value = self._call_with_timeout(name, reward, function, completion, example)
                    values.append(_as_float(value))
                except RewardTimeoutError:
                    raise
                except _CallTimedOut as exc:
                    values.append(self.on_error)
                    num_errors += 1
                    num_timeouts += 1
                    if first_error is None:
                        first_error = TimeoutError(str(exc))
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - one bad completion must not stop the iteration
                    if isinstance(exc, SystemExit) and type(exc) is not SystemExit:
                        raise  # Lightning's SIGTERMException and the like: a stop request, not a failure
                    values.append(self.on_error)
                    num_errors += 1
                    if first_error is None:
                        first_error = exc
            if check and completions and (num_errors > allowed or num_errors == len(completions)):
                raise self._failure(name, reward, num_errors, len(values), len(completions), first_error)
            if first_error is not None:
                first_errors[name] = first_error
                log.warning(
                    "reward %r failed on %d of %d completions (%d timed out; scored %s); first error: %s: %s",
                    name,
                    num_errors,
                    len(completions),
                    num_timeouts,
                    self.on_error,
                    type(first_error).__name__,
                    first_error,
                )
            # Accumulate in float64: the total is rounded to float32 once, not once per function.
            function_values = torch.tensor(values, dtype=torch.float64)
            total += reward.weight * function_values
            per_function[name] = function_values.to(torch.float32)
            errors_per_function[name] = num_errors
            timeouts_per_function[name] = num_timeouts
        return RewardResult(
            total=total.to(torch.float32),
            per_function=per_function,
            num_errors=sum(errors_per_function.values()),
            errors_per_function=errors_per_function,
            num_timeouts=sum(timeouts_per_function.values()),
            timeouts_per_function=timeouts_per_function,
            first_errors=first_errors,
        )

    def _failure(
        self,
        name: str,
        reward: Reward,
        num_errors: int,
        num_scored: int,
        num_completions: int,
        first_error: BaseException | None,
    ) -> RewardFailureError:
        """The error for a function whose failures passed ``max_error_fraction`` (or that failed on all)."""
        stopped = f" (scoring stopped after {num_scored})" if num_scored < num_completions else ""
        if num_errors == num_completions:
            why = "every completion"
        else:
            why = f"more than max_error_fraction={self.max_error_fraction:g} of them"
        first = "no error recorded" if first_error is None else _describe(first_error)
        return RewardFailureError(
            f"reward {name!r} ({reward.fn}) failed on {num_errors} of {num_completions} completions{stopped} "
            f"of one scoring call ({why}); first error: {first}; a function that fails this often is broken "
            f"(scoring it reward_on_error={self.on_error:g} would train on nothing): it is called as "
            "fn(completion: str, example: dict, **kwargs) and must return a finite number"
        )

    def _call_with_timeout(
        self,
        name: str,
        reward: Reward,
        function: Callable[..., Any],
        completion: str,
        example: Mapping[str, Any],
    ) -> Any:
        """Runs one call in the function's worker thread; abandons the worker when it overruns."""
        stuck = [worker for worker in self._abandoned.get(name, []) if worker.thread.is_alive()]
        self._abandoned[name] = stuck
        if len(stuck) >= self.max_abandoned:
            raise RewardTimeoutError(
                f"reward {name!r} ({reward.fn}) hung past its timeout={reward.timeout}s {len(stuck)} times and "
                f"those calls are still running (max_abandoned={self.max_abandoned}); threads cannot be "
                "killed: fix the function, raise its timeout, or set process: true on it (a timed-out call is then killed)"
            )
        worker = self._workers.get(name)
        if worker is None or not worker.thread.is_alive():
            worker = self._workers[name] = RewardWorker(name)
        future = worker.submit(function, completion, example, **reward.kwargs)
        try:
            return future.result(timeout=reward.timeout)
        except FutureTimeout as exc:  # the builtin TimeoutError on Python >= 3.11, its own class on 3.10
            if future.done():  # it finished in the instant between the timeout and here; use its result
                return future.result()
            worker.retire()
            del self._workers[name]
            stuck.append(worker)
            raise _CallTimedOut(f"call did not return within timeout={reward.timeout}s") from exc

    def close(self) -> None:
        """Retires the worker threads (idle ones exit now, abandoned ones when their call returns) and kills the
        reward processes."""
        for worker in self._workers.values():
            worker.retire()
        self._workers.clear()
        for process in self._processes.values():
            process.close()
        self._processes.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Threads cannot be pickled or deep-copied (ddp_spawn, copy.deepcopy of the module): a copy starts
        # without workers and creates its own on first use.
        state = self.__dict__.copy()
        state["_workers"] = {}
        state["_processes"] = {}
        state["_abandoned"] = {}
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class _CallTimedOut(Exception):
    """Internal: a call with a timeout overran it (distinguished from a function raising TimeoutError)."""


def _describe(error: BaseException) -> str:
    """``"TypeError: message"`` on one line (long messages cut), for error messages."""
    text = one_line(error)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
