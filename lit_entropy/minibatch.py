"""How one rollout splits into optimizer mini-batches and micro-batches, and the `MinibatchView` of each.

A rollout of ``N = prompts x group_size`` sequences is trained on ``ppo_epochs`` times; each pass is shuffled
(unless there is a single update) and cut into mini-batches of ``minibatch_size`` sequences, one optimizer
update each; a mini-batch is cut into micro-batches of ``microbatch_size`` sequences whose gradients accumulate.

Shapes: ``N`` sequences in the rollout, ``m`` in a mini-batch, ``n`` in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError
from lit_entropy.functional import truncated_importance_weights
from lit_entropy.regularizer import MinibatchView


def _nearby_divisors(n: int, near: int, count: int = 3) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - near), d))[:count])


@dataclass(frozen=True)
class BatchSplit:
    """The mini-batch and micro-batch sizes of one rollout and the optimizer updates they make."""

    num_sequences: int
    minibatch: int
    microbatch: int
    ppo_epochs: int

    @staticmethod
    def check_sizes(ppo_epochs: int, minibatch_size: int | None, microbatch_size: int | None) -> None:
        """The options on their own, before the rollout size is known (`of` checks that the sizes divide).

        Raises:
            ConfigError: ``ppo_epochs < 1``, or a size that is below 1 (and not null).
        """
        if ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        for name, value in (("minibatch_size", minibatch_size), ("microbatch_size", microbatch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")

    @classmethod
    def of(
        cls,
        prompts: int,
        group_size: int,
        ppo_epochs: int = 1,
        minibatch_size: int | None = None,
        microbatch_size: int | None = None,
    ) -> BatchSplit:
        """Split a rollout of ``prompts * group_size`` sequences.

        ``minibatch_size`` (None = the whole rollout) must divide ``N``; ``microbatch_size`` (None = the
        mini-batch; larger values are capped to it) must divide the mini-batch.

        Raises:
            ConfigError: Naming both fields, their values and divisors that would work.
        """
        rollout = prompts * group_size
        minibatch = minibatch_size or rollout
        if rollout % minibatch:
            raise ConfigError(
                f"model.minibatch_size={minibatch} does not divide the rollout size data.batch_size * "
                f"model.sampling.group_size = {prompts}*{group_size} = {rollout}; use a divisor of {rollout} "
                f"(e.g. {', '.join(map(str, _nearby_divisors(rollout, minibatch)))}) or null for the whole "
                "rollout"
            )
        microbatch = min(microbatch_size or minibatch, minibatch)
        if minibatch % microbatch:
            raise ConfigError(
                f"model.microbatch_size={microbatch} does not divide model.minibatch_size={minibatch}"
                f"{'' if minibatch_size else ' (the whole rollout, minibatch_size is null)'}; use a divisor of "
                f"{minibatch} (e.g. {', '.join(map(str, _nearby_divisors(minibatch, microbatch)))}) or null"
            )
        return cls(num_sequences=rollout, minibatch=minibatch, microbatch=microbatch, ppo_epochs=ppo_epochs)

    @property
    def updates(self) -> int:
        """``ppo_epochs * minibatches``; 1 means fully on-policy (old log-probs == current, ratio == 1)."""
        return self.ppo_epochs * (self.num_sequences // self.minibatch)

    @property
    def on_policy(self) -> bool:
        return self.updates == 1

    def minibatches(self, shuffle: torch.Generator) -> Iterator[tuple[int, Tensor]]:
        """``(epoch, rows)`` of every update, in order; each epoch is a permutation drawn from ``shuffle``."""
        for epoch in range(self.ppo_epochs):
            if self.updates > 1:
                order = torch.randperm(self.num_sequences, generator=shuffle)
            else:
                order = torch.arange(self.num_sequences)
            for start in range(0, self.num_sequences, self.minibatch):
                yield epoch, order[start : start + self.minibatch]

    def microbatches(self, rows: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """``(position, rows)`` of each micro-batch of a mini-batch's ``rows``; position indexes into ``rows``."""
        for start in range(0, len(rows), self.microbatch):
            part = rows[start : start + self.microbatch]
            yield slice(start, start + len(part)), part


@dataclass(frozen=True)
class RolloutTensors:
    """The per-token tensors of a rollout that stay fixed during its updates, ``[N, T]`` each.

    Attributes:
        mask: keep-mask of the real completion tokens.
        advantages: the sequence advantages broadcast to the tokens.
        old_logprobs: log-probs under the sampling policy, or None when training is fully on-policy (the
            current log-probs, detached, are then the old ones).
        ref_logprobs: log-probs under the reference, or None without a KL term.
        sampler_logprobs: the rollout engine's log-probs of the sampled tokens, for the truncated
            importance-sampling correction, or None without one.
        sampler_correction_cap: that correction's cap.
    """

    mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    sampler_logprobs: Tensor | None = None
    sampler_correction_cap: float | None = None

    def view(
        self,
        minibatch_rows: Tensor,
        microbatch: slice,
        logprobs: Tensor,
        entropy: Tensor,
        *,
        num_tokens: Tensor,
        num_sequences: int,
        eps_low: float,
        eps_high: float,
        iteration: int,
        update: int,
        updates_per_iteration: int,
        minibatch_stats: tuple[Tensor, Tensor] | None = None,
    ) -> MinibatchView:
        """What a regularizer sees of one micro-batch.

        Args:
            minibatch_rows: ``[m]`` rollout rows of the mini-batch.
            microbatch: the micro-batch's position inside ``minibatch_rows``.
            logprobs, entropy: ``[n, T]`` current log-probs (with gradient) and entropy of the micro-batch.
            num_tokens, num_sequences: the whole mini-batch's kept tokens and sequences, over all ranks.
            minibatch_stats: detached ``([m, T], [m, T])`` current log-probs and entropy of the whole mini-batch
                when a regularizer needs them (the ``minibatch_*`` fields stay None otherwise).
        """
        rows = minibatch_rows[microbatch]
        old = logprobs.detach() if self.old_logprobs is None else self.old_logprobs[rows]
        fields = {}
        if minibatch_stats is not None:
            mb_logprobs, mb_entropy = minibatch_stats
            fields = {
                "minibatch_logprobs": mb_logprobs,
                "minibatch_entropy": mb_entropy,
                "minibatch_old_logprobs": (
                    mb_logprobs if self.old_logprobs is None else self.old_logprobs[minibatch_rows]
                ),
                "minibatch_advantages": self.advantages[minibatch_rows],
                "minibatch_mask": self.mask[minibatch_rows],
            }
        if self.sampler_logprobs is not None and self.sampler_correction_cap is not None:
            fields["sampler_weights"] = truncated_importance_weights(
                old, self.sampler_logprobs[rows], self.mask[rows], self.sampler_correction_cap
            )
        return MinibatchView(
            logprobs=logprobs,
            old_logprobs=old,
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows],
            entropy=entropy,
            advantages=self.advantages[rows],
            mask=self.mask[rows],
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            eps_low=eps_low,
            eps_high=eps_high,
            iteration=iteration,
            update=update,
            updates_per_iteration=updates_per_iteration,
            microbatch_rows=microbatch,
            **fields,
        )


__all__ = ["BatchSplit", "RolloutTensors"]
