"""DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, section 3.2): train only on groups that carry a signal.

A group whose ``G`` rewards are all equal has advantage 0 for every completion: it adds no policy gradient, yet it
still takes its share of the update's token mean, so updates shrink as the policy masters (or gives up on) more
prompts. Dynamic sampling keeps only the informative groups of a rollout and samples more prompts until the
rollout holds ``B`` of them again, drawing at most ``max_rounds`` rounds.

When the cap is reached first, the rollout is topped up with uninformative groups of the first round, so every
iteration still trains on ``B`` groups (the mini-batch split stays valid); ``rollout/dynamic_short`` counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_entropy.distributed import rank, sum_over_ranks, world_size
from lit_entropy.errors import ConfigError
from lit_entropy.functional import equal_reward_groups
from lit_entropy.reward_scorer import RewardResult
from lit_entropy.rollout import Rollout, concat_groups

Examples = Sequence[Mapping[str, Any]]


@dataclass
class DynamicSampling:
    """Options of DAPO's dynamic sampling (``GRPO(dynamic_sampling=...)``; absent = off).

    Args:
        max_rounds: generation rounds per RL iteration at most, the first (the data loader's batch) included;
            DAPO's ``max_num_gen_batches``.
        prompts_per_round: prompts drawn for each further round (default: the batch size ``B``).
    """

    max_rounds: int = 4
    prompts_per_round: int | None = None

    def validate(self) -> None:
        if self.max_rounds < 2:
            raise ConfigError(
                f"dynamic_sampling.max_rounds must be >= 2 (1 would never draw more prompts), got {self.max_rounds}"
            )
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ConfigError(
                f"dynamic_sampling.prompts_per_round must be >= 1 or null, got {self.prompts_per_round}"
            )


@dataclass
class DynamicSamplingStats:
    """What one iteration's dynamic sampling did on this rank (summed over ranks by `metrics`)."""

    rounds: int  # generation rounds, the first included (the same on every rank)
    prompts: int  # prompts sampled over all rounds
    zero_std_groups: int  # sampled groups whose rewards were all equal (dropped, unless used to top up)
    short: int  # uninformative groups used to top the rollout up to B because the cap was reached

    def metrics(self, device: torch.device) -> dict[str, float]:
        """``rollout/dynamic_*``: rounds, prompts sampled, the dropped share and the top-up groups, all ranks."""
        prompts, zero, short = sum_over_ranks(
            torch.tensor([self.prompts, self.zero_std_groups, self.short], dtype=torch.float64, device=device)
        ).tolist()
        return {
            "rollout/dynamic_rounds": float(self.rounds),
            "rollout/dynamic_prompts": prompts,
            # the share of sampled groups that carried no signal: what frac_zero_std would have been
            "rollout/dynamic_frac_zero_std": zero / max(prompts, 1.0),
            "rollout/dynamic_short": short,
        }


def draw_prompts(loader: Any, count: int, generator: torch.Generator) -> list[Mapping[str, Any]]:
    """``count`` rows of the training set drawn uniformly without replacement, collated as ``loader`` collates.

    ``generator`` is shared by every rank and advanced the same way on each (one permutation a draw); each rank
    takes its own slice of the permutation, so ranks draw different prompts.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigError(
            "dynamic_sampling draws more prompts from the training set, which needs a map-style dataset "
            f"(with __len__ and __getitem__); the train dataloader's dataset is {type(dataset).__name__}"
        )
    size = len(dataset)
    order = torch.randperm(size, generator=generator)
    positions = (rank() * count + torch.arange(count)) % size
    return loader.collate_fn([dataset[int(index)] for index in order[positions]])


def sample_informative_groups(
    batch: Examples,
    options: DynamicSampling,
    generate: Callable[[Examples], Rollout],
    score: Callable[[Rollout], RewardResult],
    draw: Callable[[int], Examples],
    pad_id: int,
    in_step: bool = False,
    device: torch.device | None = None,
) -> tuple[Rollout, RewardResult, DynamicSamplingStats]:
    """Sample ``batch``, then draw and sample more prompts until ``len(batch)`` groups have unequal rewards.

    Every rank runs the same number of rounds (the loop ends when no rank lacks groups, or at the cap) and draws
    in every round, so shared generators stay in step. A rank that already has its groups skips generating,
    unless ``in_step`` (sharded generation: every rank must take part in every ``generate``). ``device``: where
    the ranks' counts are reduced (the process group's device).

    Returns the rollout of exactly ``len(batch)`` groups, their rewards, and what was done.
    """
    target = len(batch)
    parts: list[tuple[Rollout, RewardResult, Tensor]] = []
    kept = prompts = zero_std = rounds = 0
    examples: Examples | None = batch
    while True:
        rounds += 1
        if examples is not None:
            rollout = generate(examples)
            scores = score(rollout)
            equal = equal_reward_groups(scores.total, rollout.group_size).cpu()
            informative = (~equal).nonzero().flatten()[: target - kept]
            parts.append((rollout, scores, informative))
            kept += len(informative)
            prompts += len(equal)
            zero_std += int(equal.sum())
        missing = target - kept
        anyone_missing = (
            sum_over_ranks(torch.tensor([missing], dtype=torch.float64, device=device)).item() > 0
        )
        if rounds >= options.max_rounds or not anyone_missing:
            break
        drawn = draw(options.prompts_per_round or target)
        examples = drawn if missing > 0 or (in_step and world_size() > 1) else None
    short = target - kept
    if short:  # the first round had target groups, so it holds at least `short` uninformative ones
        rollout, scores, informative = parts[0]
        fill = equal_reward_groups(scores.total, rollout.group_size).cpu().nonzero().flatten()[:short]
        parts[0] = (rollout, scores, torch.cat([informative, fill]))
    group = parts[0][0].group_size
    rollout = concat_groups([(part[0], part[2]) for part in parts], pad_id)
    scores = RewardResult.concat_groups([(part[1], part[2]) for part in parts], group)
    return rollout, scores, DynamicSamplingStats(rounds, prompts, zero_std, short)


__all__ = ["DynamicSampling", "DynamicSamplingStats", "draw_prompts", "sample_informative_groups"]
