"""GSPO's sequence-level importance ratio and masking truncated completions, checked against hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from harness import WeightsAtStart, make_view, short_fit

from lit_entropy.errors import ConfigError
from lit_entropy.functional import sequence_log_ratio
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.rollout import Sampling


def test_sequence_log_ratio_is_the_masked_mean_token_log_ratio_and_its_gradient_is_one_over_length() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-0.3, -0.2, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, 9.0], [-1.0, 9.0, 9.0], [-0.3, -0.2, -0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    ratio = sequence_log_ratio(logprobs, old, mask)
    # by hand: (0.5 - 1.0) / 2, 0.5 / 1, and 0 for a sequence without kept tokens (ratio 1)
    torch.testing.assert_close(ratio, torch.tensor([[-0.25], [0.5], [0.0]]))
    ratio.sum().backward()
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )


def test_gspo_loss_and_gradient_equal_the_papers_sequence_level_formulas() -> None:
    torch.manual_seed(0)
    old = -torch.rand(3, 4) - 0.1
    logprobs = (old + 0.05 * torch.randn(3, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    eps_low, eps_high = 0.01, 0.02
    loss = Loss(
        importance_sampling_level="sequence",
        aggregation="seq-mean-token-mean",
        eps_low=eps_low,
        eps_high=eps_high,
    )
    view = make_view(logprobs, advantages, mask=mask, old_logprobs=old, eps_low=eps_low, eps_high=eps_high)
    result = microbatch_loss(loss, view, [], max_length=4)

    # GSPO (Zheng et al. 2025, eq. 5-7), written out per sequence in plain Python
    expected, grads = 0.0, torch.zeros(3, 4)
    for i in range(3):
        kept = mask[i].nonzero().flatten().tolist()
        s = math.exp(sum(float(logprobs[i, t] - old[i, t]) for t in kept) / len(kept))
        a = float(advantages[i])
        clipped = min(max(s, 1 - eps_low), 1 + eps_high)
        expected += -min(s * a, clipped * a) / 3
        unclipped = s * a <= clipped * a  # the min picks the unclipped term: it carries the gradient
        for t in kept:
            grads[i, t] = -a * s / len(kept) / 3 if unclipped else 0.0
    assert float(result.loss) == pytest.approx(expected, rel=1e-5)
    result.loss.backward()
    torch.testing.assert_close(logprobs.grad, grads, rtol=1e-4, atol=1e-6)
    # the clip decision is per sequence: a sequence's kept tokens are all clipped or none is
    clipped_any = result.clipped_low | result.clipped_high
    for i in range(3):
        assert len(set(clipped_any[i][mask[i]].tolist())) == 1


def test_token_level_is_the_default_and_unknown_levels_are_refused() -> None:
    assert Loss().importance_sampling_level == "token"
    with pytest.raises(
        ConfigError, match="loss.importance_sampling_level must be one of 'token', 'sequence'"
    ):
        Loss(importance_sampling_level="seq").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss.mask_truncated_completions must be true or false"):
        Loss(mask_truncated_completions="yes").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("masked", [False, True], ids=["kept", "masked"])
def test_truncated_completions_are_left_out_of_the_loss(
    tiny_model_dir: Path, tmp_path: Path, masked: bool
) -> None:
    # 2 new tokens: the tiny random model practically never samples EOS that early, so every completion is
    # truncated; masked, no token is left for the loss and every update is skipped as empty
    watch = WeightsAtStart()
    trainer, module = short_fit(
        tiny_model_dir,
        tmp_path,
        [watch],
        iterations=1,
        sampling=Sampling(group_size=4, max_new_tokens=2),
        loss=Loss(mask_truncated_completions=masked),
    )
    (outputs,) = watch.outputs
    assert outputs["rollout/truncated_frac"] == 1.0
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    changed = any(not torch.equal(after[n], watch.weights[n]) for n in after)
    assert changed is not masked
    assert outputs["train/skipped_empty"] == (1.0 if masked else 0.0)
