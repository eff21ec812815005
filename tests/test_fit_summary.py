"""The end-of-fit line: reward and entropy of the first and last iterations, then the last validation's metrics."""

from __future__ import annotations

import torch

from lit_entropy.fit_summary import FitSummary, fit_summary


def test_the_line_without_validation_is_reward_and_entropy_only():
    history = [(0.1, 1.0), (0.2, 0.9), (0.3, 0.8), (0.5, 0.6)]
    line = fit_summary(history, {"train/reward": torch.tensor(0.5)})
    assert line == (
        "lit_entropy: 4 RL iterations; mean over the first / last 2: reward 0.150 -> 0.400, entropy 0.950 -> 0.700 nats"
    )


def test_the_last_validation_follows_accuracy_first_then_pass_at_k_by_k():
    metrics = {
        "val/reward": torch.tensor(0.25),
        "val/pass@16": torch.tensor(0.9),
        "val/pass@2": torch.tensor(0.5),
        "val/accuracy": torch.tensor(0.125),
        "val/distinct_correct": 3.0,
        "train/entropy": torch.tensor(0.7),
    }
    line = fit_summary([(0.0, 1.0), (1.0, 0.5)], metrics)
    assert line.endswith(
        "; last validation: val/accuracy 0.125, val/pass@2 0.500, val/pass@16 0.900, "
        "val/distinct_correct 3.000, val/reward 0.250"
    )
    assert "train/entropy" not in line


def test_no_iterations_no_line():
    assert fit_summary([], {"val/accuracy": torch.tensor(1.0)}) is None
    assert FitSummary().message({"val/accuracy": 1.0}) is None


def test_fit_summary_message_passes_the_metrics_on():
    summary = FitSummary()
    summary.add(0.5, 0.25)
    summary.add(0.5, float("nan"))  # no kept tokens: not an iteration of the history
    assert summary.message() == (
        "lit_entropy: 1 RL iterations; mean over the first / last 1: reward 0.500 -> 0.500, entropy 0.250 -> 0.250 nats"
    )
    assert summary.message({"val/accuracy": torch.tensor(0.75)}).endswith(
        "; last validation: val/accuracy 0.750"
    )
