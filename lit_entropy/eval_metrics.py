"""The metrics of one evaluation stage (validation or test), accumulated over its batches.

For each prompt the policy answers once greedily (``<stage>/accuracy``: the first reward function's value) and,
when ``num_samples > 0``, samples ``num_samples`` completions: ``<stage>/reward`` (their mean total reward),
``<stage>/pass@k`` (the unbiased estimator over those samples; a sample is correct when the first reward
function gives it >= 1.0), ``<stage>/distinct_correct`` (different correct answers per prompt) and
``<stage>/distinct_answers`` (different answers per prompt, right or wrong), all three counting completion
texts; and where the first reward function reads final answers (its ``answer_of``),
``<stage>/distinct_final_answers`` (different final answers per prompt: "12" and "The answer is 12." are one).

torchmetrics' ``MeanMetric`` keeps sums and counts, so the epoch values are exact over batches and ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_entropy.errors import ConfigError
from lit_entropy.evaluation import distinct_answers, distinct_correct, distinct_final_answers, pass_at_k


class StageMetrics(torch.nn.Module):
    """Accuracy, reward, pass@k and answer diversity of one stage (a Module: Lightning moves and resets it).

    Args:
        stage: the log prefix (``val`` or ``test``).
        num_samples: sampled completions per prompt (0 = greedy accuracy only).
        pass_at_k: the k values of ``pass@k``, each in ``[1, num_samples]``.

    Raises:
        ConfigError: A k outside ``[1, num_samples]`` (named by the module's options, ``val_num_samples``).
    """

    def __init__(self, stage: str, num_samples: int, pass_at_k: list[int]) -> None:
        if pass_at_k and (min(pass_at_k) < 1 or max(pass_at_k) > num_samples):
            raise ConfigError(
                f"pass_at_k values must be in [1, val_num_samples={num_samples}], got {list(pass_at_k)}"
            )
        super().__init__()
        self.stage = stage
        self.num_samples = num_samples
        self.ks = list(pass_at_k)
        self.accuracy = MeanMetric()
        self.reward = MeanMetric()
        self.pass_at_k = torch.nn.ModuleDict({str(k): MeanMetric() for k in self.ks})
        self.distinct = MeanMetric()
        self.distinct_answers = MeanMetric()
        self.distinct_final_answers = MeanMetric()

    def update_greedy(self, first_reward: Tensor) -> dict[str, MeanMetric]:
        """Add the greedy answers' ``[B]`` first-reward values; returns the metrics to log, by name."""
        self.accuracy.update(first_reward)
        return {f"{self.stage}/accuracy": self.accuracy}

    def update_sampled(
        self,
        total_reward: Tensor,
        first_reward: Tensor,
        completions: list[str],
        answer_of: Callable[[str], str | None] | None = None,
    ) -> dict[str, MeanMetric]:
        """Add ``B * num_samples`` sampled completions (prompt-major): their ``[B*n]`` total and first rewards;
        ``answer_of`` (the first reward function's answer reader, if it has one) for the distinct final answers."""
        n = self.num_samples
        self.reward.update(total_reward)
        correct = (first_reward >= 1.0).view(-1, n)  # [B, n]
        num_correct = correct.sum(-1)  # [B]
        logged = {f"{self.stage}/reward": self.reward}
        for k in self.ks:
            self.pass_at_k[str(k)].update(pass_at_k(n, num_correct, k))
            logged[f"{self.stage}/pass@{k}"] = self.pass_at_k[str(k)]
        groups = [completions[i * n : (i + 1) * n] for i in range(len(correct))]  # one prompt's samples each
        distinct = [distinct_correct(group, flags) for group, flags in zip(groups, correct.tolist())]
        self.distinct.update(torch.tensor(distinct, dtype=torch.float32))
        logged[f"{self.stage}/distinct_correct"] = self.distinct
        answers = [distinct_answers(group) for group in groups]
        self.distinct_answers.update(torch.tensor(answers, dtype=torch.float32))
        logged[f"{self.stage}/distinct_answers"] = self.distinct_answers
        if answer_of is not None:
            finals = [distinct_final_answers(group, answer_of) for group in groups]
            self.distinct_final_answers.update(torch.tensor(finals, dtype=torch.float32))
            logged[f"{self.stage}/distinct_final_answers"] = self.distinct_final_answers
        return logged


__all__ = ["StageMetrics"]
