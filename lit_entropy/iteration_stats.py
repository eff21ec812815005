"""The statistics of one RL iteration: running sums over its micro-batches, reduced over ranks once, at the end.

Every logged ratio is formed from sums and counts that were added up over all ranks (one all-reduce of a packed
float64 vector), so a run on several ranks logs what one rank would log for the concatenated batch: global
token means and an unbiased reward std, never a mean of per-rank means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_entropy.distributed import max_over_ranks, sum_over_ranks, world_size
from lit_entropy.functional import equal_reward_groups


class IterationSums:
    """Running sums over one RL iteration's micro-batches and updates (ratios are formed once, at the end)."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.loss = zero.clone()  # summed over the updates that were made
        self.clipped_low = zero.clone()
        self.clipped_high = zero.clone()
        self.tokens = zero.clone()  # kept tokens that were trained on, over all updates
        self.kl = zero.clone()
        self.kl_tokens = zero.clone()
        self.grad_norm = zero.clone()  # summed over the updates that were made
        self.skipped_nonfinite = 0  # updates skipped for a non-finite loss or gradient
        self.skipped_empty = 0  # updates skipped because the mini-batch kept no token
        self.terms: dict[str, Tensor] = {}
        self.metrics: dict[str, tuple[Tensor, int]] = {}

    def add(self, result: Any, mask: Tensor) -> None:
        """Add one micro-batch's `MicrobatchLoss` (``mask``: its ``[n, T]`` keep-mask)."""
        self.clipped_low += (result.clipped_low & mask).sum()
        self.clipped_high += (result.clipped_high & mask).sum()
        self.tokens += mask.sum()
        if result.kl is not None:
            self.kl += (result.kl * mask).sum()
            self.kl_tokens += mask.sum()
        for key, value in result.loss_terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
        for key, value in result.metrics.items():
            total, count = self.metrics.get(key, (0.0, 0))
            self.metrics[key] = (total + torch.as_tensor(value, dtype=torch.float32), count + 1)

    def add_update(self, loss: Tensor, grad_norm: Tensor | None) -> None:
        """Add one optimizer update's loss and gradient norm; ``grad_norm`` None marks a skipped update."""
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.loss += loss


def iteration_stats(
    rewards: Tensor,
    group: int,
    completion_mask: Tensor,
    truncated: Tensor,
    scores: Any,
    sums: IterationSums,
    updates: int,
    elapsed: float,
) -> dict[str, float]:
    """The iteration's ``rollout/*``, ``train/*`` and regularizer metrics, each reduced over all ranks.

    Args:
        rewards: ``[N]`` total rewards of this rank's rollout (``N`` = prompts x ``group``).
        group: completions per prompt.
        completion_mask: ``[N, T]`` keep-mask of the completion tokens.
        truncated: ``[N]`` bool, the completions cut at ``max_new_tokens``.
        scores: the `RewardScores` of the rollout (per-function values, error and timeout counts).
        sums: the iteration's running sums.
        updates: optimizer updates of the iteration, made or skipped.
        elapsed: seconds the iteration took on this rank.
    """
    rewards = rewards.detach().float()
    function_names = sorted(scores.per_function)
    local: dict[str, Any] = {
        "sequences": rewards.numel(),
        "reward_sum": rewards.sum(),
        "reward_sq": rewards.square().sum(),
        "completion_tokens": completion_mask.sum(),
        "truncated": truncated.float().sum(),
        "zero_std_groups": equal_reward_groups(rewards, group).float().sum(),
        "groups": rewards.numel() // group,
        "reward_errors": scores.num_errors,
        "reward_timeouts": scores.num_timeouts,
        "reward_skipped": getattr(scores, "num_skipped", 0),
        "loss": sums.loss,
        "clipped_low": sums.clipped_low,
        "clipped_high": sums.clipped_high,
        "trained_tokens": sums.tokens,
        "kl": sums.kl,
        "kl_tokens": sums.kl_tokens,
        "grad_norm": sums.grad_norm,
        "skipped_nonfinite": sums.skipped_nonfinite,
        "skipped_empty": sums.skipped_empty,
    }
    for name in function_names:
        local[f"function/{name}"] = scores.per_function[name].float().sum()
    for name in sorted(sums.terms):
        local[f"term/{name}"] = sums.terms[name]
    for name in sorted(sums.metrics):
        total, count = sums.metrics[name]
        local[f"metric/{name}"] = total / count
    total = _sum_over_ranks(local, rewards.device)

    ranks = world_size()
    n = total["sequences"]
    reward_mean = total["reward_sum"] / n
    # unbiased std over all N rewards (what torch.std gives on the concatenated batch)
    reward_var = (total["reward_sq"] - n * reward_mean**2) / (n - 1) if n > 1 else 0.0
    # every rank takes the same skip decisions, so each skip was counted once per rank
    skipped_nonfinite = total["skipped_nonfinite"] / ranks
    skipped_empty = total["skipped_empty"] / ranks
    updates_made = max(updates - skipped_nonfinite - skipped_empty, 1)
    trained_tokens = max(total["trained_tokens"], 1.0)
    stats = {
        "rollout/reward_mean": reward_mean,
        "rollout/reward_std": max(reward_var, 0.0) ** 0.5,
        "rollout/completion_length": total["completion_tokens"] / n,
        "rollout/truncated_frac": total["truncated"] / n,
        "rollout/frac_zero_std": total["zero_std_groups"] / total["groups"],
        "rollout/reward_errors": total["reward_errors"],  # raised, returned a non-number, or timed out
        "rollout/reward_timeouts": total["reward_timeouts"],
        # (function, completion) pairs a batched function returned None for: "does not apply", not an error
        "rollout/reward_skipped": total["reward_skipped"],
        "train/loss": total["loss"] / updates_made,
        "train/clip_frac_low": total["clipped_low"] / trained_tokens,
        "train/clip_frac_high": total["clipped_high"] / trained_tokens,
        # gradients are synchronised, so every rank measured the same norm
        "train/grad_norm": total["grad_norm"] / ranks / updates_made,
        "train/tokens_per_sec": total["completion_tokens"] / max(elapsed, 1e-9),
        "train/updates": float(updates),
        "train/skipped_nonfinite": skipped_nonfinite,
        "train/skipped_empty": skipped_empty,
    }
    if total["kl_tokens"] > 0:
        stats["train/kl"] = total["kl"] / total["kl_tokens"]
    for key, value in total.items():
        kind, _, name = key.partition("/")
        if kind == "function":
            stats[f"rollout/reward/{name}"] = value / n
        elif kind == "term":
            stats[f"train/term/{name}"] = value / updates  # each rank holds its share of the global term
        elif kind == "metric":
            stats[name] = value / ranks
    return stats


def sampler_logprob_diff(
    trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor
) -> dict[str, float]:
    """``rollout/sampler_logprob_diff_mean`` and ``_max``: ``|trainer - sampler|`` over the kept tokens of all ranks.

    How far the rollout engine's log-probs of the sampled tokens are from the trainer's own forward pass over the
    same weights (nats); 0 for an exact sampler. A large value means the ratio's old log-probs and the sampling
    distribution disagree (see ``loss.sampler_correction_cap``).
    """
    diff = (trainer_logprobs.detach().float() - sampler_logprobs.to(trainer_logprobs.device).float()).abs()
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    total = sum_over_ranks(torch.stack([diff.sum().double(), mask.sum().double()]))
    largest = max_over_ranks(diff.max().reshape(1) if diff.numel() else diff.new_zeros(1))
    return {
        "rollout/sampler_logprob_diff_mean": float(total[0] / total[1].clamp(min=1)),
        "rollout/sampler_logprob_diff_max": float(largest[0]),
    }


def _sum_over_ranks(values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Sum every named scalar over all ranks in one all-reduce (float64, so counts stay exact)."""
    packed = torch.stack(
        [torch.as_tensor(value, dtype=torch.float64, device=device).reshape(()) for value in values.values()]
    )
    return dict(zip(values, sum_over_ranks(packed).tolist(), strict=True))


__all__ = ["IterationSums", "iteration_stats", "sampler_logprob_diff"]
