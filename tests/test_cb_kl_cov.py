"""`KLCov`: top-covariance selection, the ``|lp - old|`` penalty and its gradient, clipping off, the on-policy
warning, batch vs micro-batch scope, and real fits.

Shapes: ``m`` sequences in the mini-batch, ``n`` in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from harness import make_view, short_fit

from lit_entropy.callbacks.kl_cov import KLCov, kl_cov_penalty, kl_cov_selection
from lit_entropy.errors import ConfigError
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.regularizer import Regularizer, combine, find_regularizers

# The 2 x 3 example of test_cb_clip_cov (token (0, 2) is padding). Hand-computed there:
# cov = [[0.486, -0.414, 0 (padding)], [-0.024, -0.804, 0.876]].
LOGPROBS = torch.tensor([[-1.0, -2.0, 50.0], [-1.5, -0.2, -3.0]])  # [2, 3]
ADVANTAGES = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[True, True, False], [True, True, True]])
PLAIN_GRAD = torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]])  # on-policy: -A / 5 on kept tokens


def _state(callback: KLCov) -> dict:
    return copy.deepcopy(vars(callback))


# --- pure maths --------------------------------------------------------------------------------------


def test_selects_the_top_covariance_tokens_by_hand():
    advantages = ADVANTAGES[:, None].expand(2, 3)
    # ratio 2e-3: max(floor(0.01), 1) = 1 token, the largest cov 0.876 at (1, 2).
    assert kl_cov_selection(LOGPROBS, advantages, MASK, 2e-3).selected.tolist() == [
        [False, False, False],
        [False, False, True],
    ]
    # ratio 0.4: floor(2.0) = 2 tokens: 0.876 and 0.486. ratio 0.6: 3 tokens, adds -0.024 at (1, 0); the
    # padding (cov 0 > -0.024) is never a candidate.
    assert kl_cov_selection(LOGPROBS, advantages, MASK, 0.4).selected.tolist() == [
        [True, False, False],
        [False, False, True],
    ]
    assert kl_cov_selection(LOGPROBS, advantages, MASK, 0.6).selected.tolist() == [
        [True, False, False],
        [True, False, True],
    ]


def test_always_selects_at_least_one_token_whatever_the_sign():
    # lp [-1, -3] centred [1, -1]; A [-1, 1] centred [-1, 1]: cov = [-1, -1], both negative. No sign test:
    # one token is still selected, the tie going to the earlier token.
    selection = kl_cov_selection(
        torch.tensor([[-1.0, -3.0]]), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), 1e-4
    )
    assert torch.equal(selection.cov, torch.tensor([[-1.0, -1.0]]))
    assert selection.selected.tolist() == [[True, False]]
    # Equal advantages: every cov is 0, still one token (the first kept one: (0, 1) since (0, 0) is padding).
    mask = torch.tensor([[False, True, True]])
    selection = kl_cov_selection(torch.tensor([[-1.0, -2.0, -3.0]]), torch.ones(1, 3), mask, 1e-4)
    assert selection.selected.tolist() == [[False, True, False]]
    # Nothing kept: nothing selected.
    assert not kl_cov_selection(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), 0.5).selected.any()


def test_penalty_and_its_gradient_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    logprobs = (old + torch.tensor([[0.25, -0.5, 0.0]])).requires_grad_(True)
    selected = torch.tensor([[True, True, False]])
    penalty = kl_cov_penalty(logprobs, old, selected, kl_coef=2.0)
    # 2 * |0.25| = 0.5, 2 * |-0.5| = 1, unselected 0.
    assert torch.allclose(penalty, torch.tensor([[0.5, 1.0, 0.0]]))
    penalty.sum().backward()
    assert torch.equal(logprobs.grad, torch.tensor([[2.0, -2.0, 0.0]]))  # kl_coef * sign(lp - old)


def test_penalty_gradient_is_zero_on_policy_and_not_nan_at_padding():
    old = torch.tensor([[-1.0, float("nan")]])
    logprobs = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    penalty = kl_cov_penalty(logprobs, old, torch.tensor([[True, False]]), kl_coef=1.0)
    penalty.sum().backward()
    assert torch.equal(penalty, torch.zeros(1, 2))
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))  # |x|' at 0 is 0; NaN never reaches the gradient


# --- the callback in the loss ------------------------------------------------------------------------


def test_on_policy_the_penalty_and_its_gradient_are_exactly_zero():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    view = make_view(logprobs, ADVANTAGES, MASK)  # old = lp: every ratio is 1
    callback = KLCov(ratio=0.6, kl_coef=5.0)
    adjustment = callback.adjust(view)
    assert torch.equal(adjustment.token_penalties, torch.zeros(2, 3))
    result = microbatch_loss(Loss(), view, [callback], max_length=3)
    result.loss.backward()
    # Exactly plain GRPO: per-token -A, (-2 + 1.5) / 5 = -0.1, gradient -A / 5.
    assert result.loss.item() == pytest.approx(-0.1, abs=1e-7)
    assert torch.equal(logprobs.grad, PLAIN_GRAD)


def test_off_policy_the_penalty_has_a_gradient_on_the_selected_token():
    old = LOGPROBS.clone()
    delta = torch.tensor([[0.1, -0.1, 0.0], [0.1, 0.05, -0.1]])
    logprobs = (old + delta).requires_grad_(True)
    view = make_view(logprobs, ADVANTAGES, MASK, old_logprobs=old)
    # Current kept lp: -0.9, -2.1, -1.4, -0.15, -3.1 (mean -1.53), A mean 0.1: the top cov is still (1, 2):
    # (-3.1 + 1.53) * (-0.6) = 0.942 > (0, 0): 0.63 * 0.9 = 0.567.
    callback = KLCov(ratio=2e-3, kl_coef=0.5)
    penalties = callback.adjust(view).token_penalties
    assert torch.allclose(penalties, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.05]]))  # 0.5 * |-0.1|
    with_penalty = microbatch_loss(Loss(), view, [callback], max_length=3)
    with_penalty.loss.backward()
    grad = logprobs.grad.clone()
    logprobs.grad = None
    # Reference: the same unclipped surrogate without the penalty (all ratios here are within [0.8, 1.2]).
    plain = microbatch_loss(Loss(), view, [], max_length=3)
    plain.loss.backward()
    # The penalty adds 0.05 / 5 = 0.01 to the loss and 0.5 * sign(-0.1) / 5 = -0.1 to the gradient of (1, 2).
    assert with_penalty.loss.item() - plain.loss.item() == pytest.approx(0.01, abs=1e-6)
    expected = logprobs.grad.clone()
    expected[1, 2] += -0.1
    assert torch.allclose(grad, expected, atol=1e-6)
    assert grad[1, 2].item() != pytest.approx(logprobs.grad[1, 2].item(), abs=1e-3)


def test_disables_ppo_clipping():
    old = LOGPROBS.clone()
    logprobs = (old + torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])).requires_grad_(True)
    view = make_view(logprobs, ADVANTAGES, MASK, old_logprobs=old)
    callback = KLCov(kl_coef=0.0)  # penalty off: only the clip override is left
    combined = combine([callback], view)
    assert (combined.eps_low, combined.eps_high) == (1.0, math.inf)
    # Token (0, 0): A = 1, ratio e^0.5 > 1.2, clipped by plain PPO;
    # token (1, 1): A = -0.5, ratio e^-0.5 < 0.8.
    plain = microbatch_loss(Loss(), view, [], max_length=3)
    assert bool(plain.clipped_high[0, 0]) and bool(plain.clipped_low[1, 1])
    result = microbatch_loss(Loss(), view, [callback], max_length=3)
    assert not result.clipped_high.any() and not result.clipped_low.any()
    result.loss.backward()
    # Unclipped surrogate -A * ratio: gradient -A * ratio / 5,
    # i.e. -e^0.5 / 5 at (0, 0) and 0.5 * e^-0.5 / 5 at (1, 1).
    assert logprobs.grad[0, 0].item() == pytest.approx(-math.exp(0.5) / 5, rel=1e-6)
    assert logprobs.grad[1, 1].item() == pytest.approx(0.5 * math.exp(-0.5) / 5, rel=1e-6)


def test_conflicts_with_another_owner_of_the_clip_range():
    class AdaptiveClip(Regularizer):  # stands for ADAPO, which owns eps_high
        replaces = ("eps_high",)

    with pytest.raises(ConfigError, match=r"regularizers KLCov and AdaptiveClip both replace 'eps_high'"):
        find_regularizers([KLCov(), AdaptiveClip()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_scope_selects_the_same_tokens_whole_or_split(seed):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(4, 6, generator=generator)  # [4, 6]
    advantages = torch.randn(4, generator=generator)
    mask = torch.rand(4, 6, generator=generator) > 0.2
    old = logprobs - 0.1 - 0.2 * torch.rand(4, 6, generator=generator)  # |lp - old| > 0 everywhere
    callback = KLCov(ratio=0.2)

    def penalties(rows: slice) -> torch.Tensor:
        return callback.adjust(
            make_view(logprobs, advantages, mask, old_logprobs=old, rows=rows)
        ).token_penalties

    whole = penalties(slice(0, 4))
    assert torch.equal(torch.cat([penalties(slice(0, 2)), penalties(slice(2, 4))]), whole)
    assert int((whole > 0).sum()) == max(math.floor(0.2 * int(mask.sum())), 1)


def test_microbatch_scope_centres_and_ranks_per_microbatch_and_may_differ():
    # 4 sequences x 1 token, lp = [-0.5, -1.5, -2.5, -3.5], A = [1, -1, 1, -1].
    # Whole: mean lp -2, mean A 0: cov = [1.5, -0.5, -0.5, 1.5]; ratio 0.5 -> top 2: rows 0 and 3.
    # Per micro-batch (rows 0-1, then 2-3): cov = [0.5, 0.5] each; 1 token each, ties to the first: rows 0, 2.
    logprobs = torch.tensor([[-0.5], [-1.5], [-2.5], [-3.5]])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = logprobs - 0.25  # |lp - old| = 0.25 everywhere
    for scope, expected in (("batch", [0.25, 0.0, 0.0, 0.25]), ("microbatch", [0.25, 0.0, 0.25, 0.0])):
        callback = KLCov(ratio=0.5, scope=scope)
        split = [
            callback.adjust(make_view(logprobs, advantages, old_logprobs=old, rows=rows)).token_penalties
            for rows in (slice(0, 2), slice(2, 4))
        ]
        assert torch.cat(split).squeeze(1).tolist() == expected, scope


def test_metrics_describe_the_selection():
    old = LOGPROBS.clone()
    logprobs = old + torch.tensor([[0.1, -0.1, 0.0], [0.1, 0.05, -0.3]])
    metrics = KLCov(ratio=2e-3).adjust(make_view(logprobs, ADVANTAGES, MASK, old_logprobs=old)).metrics
    # One token of 5 kept, (1, 2) with |lp - old| = 0.3; its cov: kept lp -0.9, -2.1, -1.4, -0.15, -3.3,
    # mean -1.57, so (-3.3 + 1.57) * (-0.5 - 0.1) = 1.038.
    assert float(metrics["selected_frac"]) == pytest.approx(1 / 5)
    assert float(metrics["selected_abs_log_ratio"]) == pytest.approx(0.3, abs=1e-6)
    assert float(metrics["selected_cov"]) == pytest.approx(1.038, abs=1e-5)


def test_adjust_and_override_do_not_change_state():
    callback = KLCov(ratio=0.5)
    before, state_before = _state(callback), callback.state_dict()
    for update in range(3):
        view = make_view(LOGPROBS, ADVANTAGES, MASK, update=update, old_logprobs=LOGPROBS - 0.1)
        callback.replace_inputs(view)
        callback.adjust(view)
    assert _state(callback) == before
    assert callback.state_dict() == state_before == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"KLCov.ratio must be a fraction in \(0, 1\], got 0.0"),
        ({"ratio": 1.01}, r"KLCov.ratio .* got 1.01"),
        ({"kl_coef": -0.1}, r"KLCov.kl_coef must be a finite number >= 0, got -0.1"),
        ({"kl_coef": float("inf")}, r"KLCov.kl_coef .* got inf"),
        ({"scope": "rank"}, r"KLCov.scope must be one of \['batch', 'microbatch'\], got 'rank'"),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KLCov(**kwargs)


# --- real fits ---------------------------------------------------------------------------------------


def test_fit_with_one_update_per_rollout_warns_once(tiny_model_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # duplicates would be recorded: "once" must come from the callback
        trainer, _ = short_fit(tiny_model_dir, tmp_path, [KLCov()], iterations=3)
    messages = [str(w.message) for w in caught if "KLCov is a no-op" in str(w.message)]
    assert len(messages) == 1
    assert "train/updates == 1" in messages[0]
    assert trainer.logged_metrics["train/updates"].item() == 1.0


def test_fit_with_several_updates_logs_metrics_and_never_clips(tiny_model_dir, tmp_path):
    callback = KLCov(ratio=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = short_fit(
            tiny_model_dir, tmp_path, [callback], ppo_epochs=2, minibatch_size=4, microbatch_size=2
        )
    assert not [w for w in caught if "KLCov is a no-op" in str(w.message)]
    metrics = trainer.logged_metrics
    assert metrics["train/updates"].item() == 4.0
    for key in ("selected_frac", "selected_cov", "selected_abs_log_ratio"):
        assert f"reg/KLCov/{key}" in metrics
    # Mini-batches of 4 sequences x 1 to 6 tokens: max(floor(0.1 * n), 1) / n is in (0, 1/4].
    assert 0.0 < metrics["reg/KLCov/selected_frac"].item() <= 0.25
    # Later updates are off-policy (lr 1e-2), so the selected tokens have moved.
    assert metrics["reg/KLCov/selected_abs_log_ratio"].item() > 0.0
    assert metrics["train/clip_frac_low"].item() == metrics["train/clip_frac_high"].item() == 0.0
