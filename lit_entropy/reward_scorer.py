"""`RewardScorer`: the weighted sum of reward functions, with per-completion failure isolation and timeouts.

Two forms (`lit_entropy.reward_forms`): a per-completion function is called once per completion, a batched one
(TRL's) once per scoring call with every completion; ``None`` from a batched function means "does not apply"
(counted in ``num_skipped``, adds nothing). ``async def`` functions run on an event loop of their own
(`lit_entropy.reward_worker.AsyncRewardWorker`), the per-completion form with every completion's call at once.

Timeouts: ``timeout: 5.0`` on a reward (seconds, per completion) runs that function's calls in a worker thread
and scores a call that has not returned in time ``on_error`` (counted in ``RewardResult.num_timeouts`` and in
``num_errors``). Python cannot kill a thread, so the stuck call is *abandoned*: its daemon thread keeps running
until the call returns (or the process exits) and a fresh worker serves the next completion. More than
``max_abandoned`` (default 8) abandoned calls of one function still running at once raise `RewardTimeoutError`:
such a function needs fixing, or ``process: true`` (its calls are killed at the timeout). Without ``timeout`` (the default)
the function is called directly in the training thread, exactly as before. A batched function's ``timeout`` is for
the whole call (all N completions); past it every completion counts as timed out. An ``async def`` function's
calls are cancelled at their timeout; a loop still busy at twice the timeout plus a second (a coroutine that
blocks without awaiting) is abandoned like a thread, its unfinished call timed out.

Systematic failures stop the run: a function that fails on every completion of one scoring call (a wrong
signature, a field the rows lack, a wrong return type), or on more than ``max_error_fraction`` of them, raises
`RewardFailureError` naming the function, the count and the first exception, instead of training on
``on_error``. Failures on fewer completions are counted and the run goes on. A batched call that raises (or
returns something other than N values) fails on every completion.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError, LitEntropyError, one_line
from lit_entropy.reward_calls import CallRunner, RewardTimeoutError, Tally
from lit_entropy.reward_forms import (
    BATCHED_ARGUMENTS,
    BATCHED_SIGNATURE,
    PER_COMPLETION_SIGNATURE,
    detect_form,
    signature_text,
)
from lit_entropy.reward_spec import Reward, resolve_reward_function

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
        per_function: Name -> ``[N]`` float32 unweighted values (``on_error`` where the function failed, 0.0
            where a batched function returned ``None``: what it adds to the total there).
        num_errors: Failed (function, completion) calls, summed over functions: raised, returned a
            non-numeric / non-finite value, or timed out.
        errors_per_function: Name -> failed calls of that function (timeouts included).
        num_timeouts: The failed calls that were cut by their function's ``timeout`` (included in
            ``num_errors``).
        timeouts_per_function: Name -> timed-out calls of that function.
        first_errors: Name -> the first exception of that function in this call (a `TimeoutError` for a
            timeout); functions without failures are absent.
        num_skipped: (function, completion) pairs where a batched function returned ``None`` ("does not
            apply"): not failures, they add nothing to the total.
        skipped_per_function: Name -> completions that function returned ``None`` for.
        num_unscored: Completions for which every function returned ``None``: their total is 0.0 (TRL's rule,
            a sum that skips ``None``), with a warning.
    """

    total: Tensor
    per_function: dict[str, Tensor]
    num_errors: int
    errors_per_function: dict[str, int]
    num_timeouts: int = 0
    timeouts_per_function: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, BaseException] = field(default_factory=dict)
    num_skipped: int = 0
    skipped_per_function: dict[str, int] = field(default_factory=dict)
    num_unscored: int = 0

    @staticmethod
    def concat_groups(parts: Sequence[tuple[RewardResult, Tensor]], group_size: int) -> RewardResult:
        """The rewards of the groups ``indices`` of each ``(result, indices)`` part, in order (as
        `lit_entropy.rollout.concat_groups` lays out their completions).

        Counts (errors, timeouts, skips) are summed over every part whole: a failure in a group that was not
        kept still happened. The first error of each function is the first part's.
        """

        def rows(indices: Tensor) -> Tensor:
            return (indices.long()[:, None] * group_size + torch.arange(group_size)).flatten()

        def add(counts: list[dict[str, int]]) -> dict[str, int]:
            total: dict[str, int] = {}
            for count in counts:
                for name, value in count.items():
                    total[name] = total.get(name, 0) + value
            return total

        results = [result for result, _ in parts]
        first_errors: dict[str, BaseException] = {}
        for result in results:
            for name, error in result.first_errors.items():
                first_errors.setdefault(name, error)
        return RewardResult(
            total=torch.cat([result.total[rows(indices)] for result, indices in parts]),
            per_function={
                name: torch.cat([result.per_function[name][rows(indices)] for result, indices in parts])
                for name in results[0].per_function
            },
            num_errors=sum(result.num_errors for result in results),
            errors_per_function=add([result.errors_per_function for result in results]),
            num_timeouts=sum(result.num_timeouts for result in results),
            timeouts_per_function=add([result.timeouts_per_function for result in results]),
            first_errors=first_errors,
            num_skipped=sum(result.num_skipped for result in results),
            skipped_per_function=add([result.skipped_per_function for result in results]),
            num_unscored=sum(result.num_unscored for result in results),
        )


class RewardFailureError(LitEntropyError, RuntimeError):
    """A reward function failed on every completion of one scoring call, or on more than its allowed share.

    Such a function is broken, not unlucky: training on its ``on_error`` value would learn nothing from it.
    """


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
            timeout that is not a positive number of seconds, two functions with the same metric name, a
            ``max_error_fraction`` outside ``[0, 1]``, an unknown or ambiguous ``form``
            (`lit_entropy.reward_forms.detect_form`), or batched ``kwargs`` named like its arguments.
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
        self._runners: dict[str, CallRunner] = {}
        self.rewards: list[Reward] = []
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
            form = detect_form(function, reward.form, f"rewards[{index}] ({reward.fn!r})")
            if form == "batched" and set(reward.kwargs) & set(BATCHED_ARGUMENTS):
                raise ConfigError(
                    f"rewards[{index}] ({reward.fn!r}): kwargs {sorted(set(reward.kwargs) & set(BATCHED_ARGUMENTS))} "
                    f"are arguments of the batched form ({', '.join(BATCHED_ARGUMENTS)}); rename them"
                )
            # functools.partial and callable instances have no __name__: fall back to the path's last part.
            name = reward.name or getattr(function, "__name__", None) or re.split(r"[.:]", reward.fn)[-1]
            if name in self._names:
                raise ConfigError(
                    f"duplicate reward name {name!r} (from {reward.fn!r}); set a distinct `name` for each"
                )
            self.rewards.append(reward)
            self._names.append(name)
            self._runners[name] = CallRunner(reward, function, name, form, max_abandoned)

    @property
    def names(self) -> list[str]:
        """Metric names of the functions, in config order."""
        return list(self._names)

    @property
    def functions(self) -> list[Callable[..., Any]]:
        """The resolved functions, in config order."""
        return [self._runners[name].function for name in self._names]

    @property
    def forms(self) -> list[str]:
        """How each function is called, ``"batched"`` or ``"per_completion"``, in config order."""
        return [self._runners[name].form for name in self._names]

    def __call__(
        self,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        *,
        prompts: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        check_failures: bool = True,
    ) -> RewardResult:
        """Scores each completion against its dataset row.

        Args:
            completions: N completion texts.
            examples: N dataset rows, ``examples[i]`` being the row ``completions[i]`` answers (a prompt's
                row repeated G times for its G completions).
            prompts: N prompts for the batched form; default: each row's ``"prompt"`` (the dataset's prompt,
                what TRL passes).
            completion_ids: N token id lists for the batched form
                (`lit_entropy.reward_forms.completion_token_ids`); default None: batched functions receive
                ``completion_ids=None``.
            check_failures: Raise `RewardFailureError` for a function failing on every completion or on more
                than ``max_error_fraction`` of them (unless that is ``None``). ``False`` only counts, e.g. for
                a probe that inspects ``first_errors`` itself.

        Returns:
            The weighted total ``[N]`` and per-function values, with error, timeout and skip counts. The first
            failure of each function in this call is logged as a warning with the exception.

        Raises:
            RewardTimeoutError: A function has more than ``max_abandoned`` timed-out calls still running.
            RewardFailureError: With ``check_failures``, a function failed on every completion, or on more
                than ``max_error_fraction`` of them (raised as soon as that share is exceeded).
            KeyboardInterrupt: Raised by a function (or Ctrl-C while it runs): the run stops.
        """
        count = len(completions)
        for what, given in (("examples", examples), ("prompts", prompts), ("completion_ids", completion_ids)):
            if given is not None and len(given) != count:
                raise ValueError(f"got {count} completions but {len(given)} {what}; pass one per completion")
        total = torch.zeros(count, dtype=torch.float64)
        applied = torch.zeros(count, dtype=torch.bool)
        per_function: dict[str, Tensor] = {}
        errors: dict[str, int] = {}
        timeouts: dict[str, int] = {}
        skips: dict[str, int] = {}
        first_errors: dict[str, BaseException] = {}
        for index, (reward, name) in enumerate(zip(self.rewards, self._names)):
            tally = Tally(self.on_error)
            check = check_failures and self.max_error_fraction is not None
            allowed = count * (self.max_error_fraction or 0.0)
            runner = self._runners[name]
            if runner.form == "batched":
                runner.score_batched(tally, completions, examples, prompts, completion_ids)
            else:
                runner.score_each(tally, completions, examples, allowed if check else None)
            if check and completions and (tally.num_errors > allowed or tally.num_errors == count):
                raise self._failure(index, tally, count)
            if tally.first_error is not None:
                first_errors[name] = tally.first_error
                log.warning(
                    "reward %r failed on %d of %d completions (%d timed out; scored %s); first error: %s: %s",
                    name,
                    tally.num_errors,
                    count,
                    tally.num_timeouts,
                    self.on_error,
                    type(tally.first_error).__name__,
                    tally.first_error,
                )
            # Accumulate in float64: the total is rounded to float32 once, not once per function.
            function_values = torch.tensor(tally.values, dtype=torch.float64)
            total += reward.weight * function_values
            applied |= ~torch.tensor(tally.skipped, dtype=torch.bool)
            per_function[name] = function_values.to(torch.float32)
            errors[name] = tally.num_errors
            timeouts[name] = tally.num_timeouts
            skips[name] = sum(tally.skipped)
        unscored = int((~applied).sum()) if count else 0
        if unscored:
            first = int((~applied).nonzero()[0])
            log.warning(
                "every reward function returned None for %d of %d completions (first: completion %d): their "
                "total reward is 0.0; make at least one function score every completion",
                unscored,
                count,
                first,
            )
        return RewardResult(
            total=total.to(torch.float32),
            per_function=per_function,
            num_errors=sum(errors.values()),
            errors_per_function=errors,
            num_timeouts=sum(timeouts.values()),
            timeouts_per_function=timeouts,
            first_errors=first_errors,
            num_skipped=sum(skips.values()),
            skipped_per_function=skips,
            num_unscored=unscored,
        )

    def _failure(self, index: int, tally: Tally, num_completions: int) -> RewardFailureError:
        """The error for a function whose failures passed ``max_error_fraction`` (or that failed on all)."""
        reward, name = self.rewards[index], self._names[index]
        form = self._runners[name].form
        num_errors, first_error = tally.num_errors, tally.first_error
        num_scored = len(tally.values)
        stopped = f" (scoring stopped after {num_scored})" if num_scored < num_completions else ""
        if num_errors == num_completions:
            why = "every completion"
        else:
            why = f"more than max_error_fraction={self.max_error_fraction:g} of them"
        first = "no error recorded" if first_error is None else _describe(first_error)
        if form == "batched":
            called = (
                f"it is called once for all completions as {BATCHED_SIGNATURE} (the batched form) and must "
                "return one finite number or None per completion"
            )
        else:
            called = (
                f"it is called as {PER_COMPLETION_SIGNATURE} (the per-completion form) and must return a "
                "finite number"
            )
        if isinstance(first_error, TypeError):
            other = PER_COMPLETION_SIGNATURE if form == "batched" else BATCHED_SIGNATURE
            called += (
                f"; its signature is {signature_text(self._runners[name].function)}, and the other accepted "
                f"form is {other}: set form: batched or form: per_completion on the reward if it was told wrong"
            )
        return RewardFailureError(
            f"reward {name!r} ({reward.fn}) failed on {num_errors} of {num_completions} completions{stopped} "
            f"of one scoring call ({why}); first error: {first}; a function that fails this often is broken "
            f"(scoring it reward_on_error={self.on_error:g} would train on nothing): {called}"
        )

    def close(self) -> None:
        """Retires the worker threads and event loops (idle ones exit now, abandoned ones when their call
        returns) and kills the reward processes."""
        for runner in self._runners.values():
            runner.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def _describe(error: BaseException) -> str:
    """``"TypeError: message"`` on one line (long messages cut), for error messages."""
    text = one_line(error)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
