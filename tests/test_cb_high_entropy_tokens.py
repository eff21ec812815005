"""`HighEntropyTokens`: the quantile and its tie rule, weights in the loss, batch vs micro-batch scope, real
fits, and composition with `ClipCov` (weights multiply).

Shapes: ``m`` sequences in the mini-batch, ``n`` in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from harness import make_view, short_fit

import lit_entropy.loss
from lit_entropy.callbacks.clip_cov import ClipCov
from lit_entropy.callbacks.high_entropy_tokens import (
    HighEntropyTokens,
    high_entropy_count,
    high_entropy_mask,
    high_entropy_threshold,
)
from lit_entropy.errors import ConfigError
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.regularizer import combine

# 10 kept tokens with a tie at 4, and padding (entropy 9, the largest) in the last column of both rows.
TIED_ENTROPY = torch.tensor([[5.0, 4.0, 4.0, 3.0, 2.0, 9.0], [1.0, 0.5, 0.25, 0.0, 0.0, 9.0]])  # [2, 6]
TIED_MASK = torch.tensor([[True] * 5 + [False], [True] * 5 + [False]])


# --- pure maths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rho", "threshold", "selected"),
    [
        # k = ceil(rho * 10); threshold = k-th largest of 5, 4, 4, 3, 2, 1, 0.5, 0.25, 0, 0.
        (0.1, 5.0, 1),  # k = 1
        (0.2, 4.0, 3),  # k = 2: threshold 4, and BOTH 4s are kept (ties at the threshold): 3 tokens
        (0.3, 4.0, 3),  # k = 3, not 4: 0.3 * 10 = 3.0000000000000004 in binary is rounded first
        (0.4, 3.0, 4),  # k = 4
        (1.0, 0.0, 10),  # k = 10: every kept token
    ],
)
def test_threshold_and_tie_rule_by_hand(rho, threshold, selected):
    assert high_entropy_threshold(TIED_ENTROPY, TIED_MASK, rho).item() == threshold
    chosen = high_entropy_mask(TIED_ENTROPY, TIED_MASK, rho)
    assert int(chosen.sum()) == selected
    assert not (chosen & ~TIED_MASK).any()  # padding (entropy 9) is never selected


def test_count_is_ceil_of_rho_n():
    assert [high_entropy_count(0.2, n) for n in (0, 1, 5, 6, 7, 10, 11)] == [0, 1, 1, 2, 2, 2, 3]
    assert high_entropy_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 must not become 4
    assert high_entropy_count(0.7, 10) == 7  # 7.000000000000001 must not become 8


def test_nothing_kept_selects_nothing():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert high_entropy_threshold(torch.ones(2, 3), mask, 0.2).item() == math.inf
    assert not high_entropy_mask(torch.ones(2, 3), mask, 0.2).any()


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.37, 0.5, 0.9])
def test_distinct_entropies_select_exactly_the_top_ceil_rho_n(rho):
    generator = torch.Generator().manual_seed(int(rho * 100))
    entropy = 4 * torch.rand(6, 7, generator=generator)  # distinct with probability 1
    mask = torch.rand(6, 7, generator=generator) > 0.3
    # Naive, independent: sort the kept (value, position) pairs and take the first ceil(rho * n) exactly.
    kept = [(entropy[i, t].item(), (i, t)) for i in range(6) for t in range(7) if mask[i, t]]
    count = math.ceil(Fraction(str(rho)) * len(kept))
    expected = {position for _, position in sorted(kept, reverse=True)[:count]}
    chosen = high_entropy_mask(entropy, mask, rho)
    assert {tuple(p) for p in chosen.nonzero().tolist()} == expected


def test_same_count_as_trl_linear_quantile_for_rho_0_2():
    # TRL thresholds at torch.quantile(kept, 1 - rho) (linear interpolation) with >=; for distinct values and
    # rho = 0.2 that is the same number of tokens as ceil(0.2 * n) (the module docstring's claim).
    for n in range(1, 60):
        entropy = torch.arange(n, dtype=torch.float32)[None, :] / 7  # [1, n], distinct
        mask = torch.ones(1, n, dtype=torch.bool)
        trl = int((entropy >= torch.quantile(entropy[mask], 0.8)).sum())
        assert int(high_entropy_mask(entropy, mask, 0.2).sum()) == trl == math.ceil(0.2 * n - 1e-9), n


# --- the callback ------------------------------------------------------------------------------------


def test_weights_keep_the_gradient_only_on_high_entropy_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]], requires_grad=True)
    entropy = torch.tensor([[3.0, 1.0, 9.0], [2.0, 0.5, 4.0]])  # (0, 2) is padding
    mask = torch.tensor([[True, True, False], [True, True, True]])
    view = make_view(logprobs, torch.tensor([1.0, -0.5]), mask, entropy=entropy)
    callback = HighEntropyTokens(rho=0.4)
    adjustment = callback.adjust(view)
    # Kept entropies 3, 1, 2, 0.5, 4; k = ceil(0.4 * 5) = 2: threshold 3, tokens (0, 0) and (1, 2).
    assert adjustment.token_weights.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert float(adjustment.metrics["selected_frac"]) == pytest.approx(2 / 5)
    assert float(adjustment.metrics["threshold"]) == 3.0
    result = microbatch_loss(Loss(), view, [callback], max_length=3)
    result.loss.backward()
    # On-policy per-token loss -A on the two kept tokens, normalised by all 5 kept: (-1 + 0.5) / 5 = -0.1.
    assert result.loss.item() == pytest.approx(-0.1, abs=1e-7)
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.2, 0.0, 0.0], [0.0, 0.0, 0.1]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_scope_selects_the_same_tokens_whole_or_split(seed):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(4, 6, generator=generator)
    entropy = 4 * torch.rand(4, 6, generator=generator)
    mask = torch.rand(4, 6, generator=generator) > 0.2
    callback = HighEntropyTokens(rho=0.3)

    def weights(rows: slice) -> torch.Tensor:
        view = make_view(logprobs, torch.zeros(4), mask, entropy=entropy, rows=rows)
        return callback.adjust(view).token_weights

    whole = weights(slice(0, 4))
    assert torch.equal(torch.cat([weights(slice(0, 2)), weights(slice(2, 4))]), whole)
    assert int(whole.sum()) == high_entropy_count(0.3, int(mask.sum()))


def test_microbatch_scope_thresholds_per_microbatch_and_may_differ():
    # Entropies [4, 3, 2, 1] (one token each), rho 0.5. Whole: k = 2, threshold 3: rows 0, 1.
    # Per micro-batch: [4, 3] -> k = 1, row 0; [2, 1] -> k = 1, row 2.
    entropy = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    for scope, expected in (("batch", [1.0, 1.0, 0.0, 0.0]), ("microbatch", [1.0, 0.0, 1.0, 0.0])):
        callback = HighEntropyTokens(rho=0.5, scope=scope)
        split = [
            callback.adjust(make_view(-entropy, torch.ones(4), entropy=entropy, rows=rows)).token_weights
            for rows in (slice(0, 2), slice(2, 4))
        ]
        assert torch.cat(split).squeeze(1).tolist() == expected, scope


def test_adjust_does_not_change_state():
    callback = HighEntropyTokens(rho=0.3)
    before, state_before = copy.deepcopy(vars(callback)), callback.state_dict()
    for update in range(3):
        callback.adjust(
            make_view(-TIED_ENTROPY, torch.ones(2), TIED_MASK, entropy=TIED_ENTROPY, update=update)
        )
    assert vars(callback) == before
    assert callback.state_dict() == state_before == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.0}, r"HighEntropyTokens.rho must be a fraction in \(0, 1\], got 0.0"),
        ({"rho": -0.2}, r"HighEntropyTokens.rho .* got -0.2"),
        ({"rho": 1.2}, r"HighEntropyTokens.rho .* got 1.2"),
        (
            {"scope": "tokens"},
            r"HighEntropyTokens.scope must be one of \['batch', 'microbatch'\], got 'tokens'",
        ),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HighEntropyTokens(**kwargs)


def test_composes_with_clip_cov_by_multiplying_weights_in_any_order():
    generator = torch.Generator().manual_seed(0)
    logprobs = -3 * torch.rand(4, 6, generator=generator)
    entropy = 4 * torch.rand(4, 6, generator=generator)
    view = make_view(logprobs, torch.randn(4, generator=generator), entropy=entropy)
    clip, high = ClipCov(ratio=0.2, cov_lb=-1e9, cov_ub=1e9), HighEntropyTokens(rho=0.5)
    w_clip, w_high = clip.adjust(view).token_weights, high.adjust(view).token_weights
    assert (w_clip == 0).any() and (w_high == 0).any() and ((w_clip == 0) != (w_high == 0)).any()
    for order in ([clip, high], [high, clip]):
        assert torch.equal(combine(order, view).token_weights, w_clip * w_high)


# --- real fits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["batch", "microbatch"])
def test_fit_logs_metrics(tiny_model_dir, tmp_path, scope):
    # In micro-batch scope the callback asks for no mini-batch statistics, and the module then builds views
    # without them: the fit would fail if it read them.
    callback = HighEntropyTokens(rho=0.2, scope=scope)
    assert callback.needs_minibatch_stats == (scope == "batch")
    trainer, _ = short_fit(
        tiny_model_dir,
        tmp_path,
        [callback],
        ppo_epochs=2,
        minibatch_size=4,
        microbatch_size=2,
    )
    metrics = trainer.logged_metrics
    # ceil(0.2 * n) of n kept tokens per mini-batch (n <= 24), ties aside: a small fraction, never 0.
    assert 0.0 < metrics["reg/HighEntropyTokens/selected_frac"].item() <= 0.5
    assert 0.0 < metrics["reg/HighEntropyTokens/threshold"].item() <= math.log(99) + 1e-4  # <= log V


def test_fit_with_clip_cov_multiplies_the_two_selections(tiny_model_dir, tmp_path, monkeypatch):
    clip, high = ClipCov(ratio=0.2, cov_lb=-1e3, cov_ub=1e3), HighEntropyTokens(rho=0.5)
    real_combine = lit_entropy.loss.combine
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def checking_combine(regularizers, view):
        # A spy on the project's own function (no library is mocked): adjust is pure, so asking each
        # regularizer again gives exactly the weights the real combine composed.
        combined = real_combine(regularizers, view)
        seen.append(
            (clip.adjust(view).token_weights, high.adjust(view).token_weights, combined.token_weights)
        )
        return combined

    monkeypatch.setattr(lit_entropy.loss, "combine", checking_combine)
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path, [clip, high], ppo_epochs=2, minibatch_size=4, microbatch_size=2
    )
    assert len(seen) == 16  # 2 iterations x 4 updates x 2 micro-batches
    for w_clip, w_high, combined in seen:
        assert torch.equal(combined, w_clip * w_high)
    # Each removed some tokens the other kept: the product is not just one of them.
    assert any(((c == 0) & (h == 1)).any() for c, h, _ in seen)
    assert any(((h == 0) & (c == 1)).any() for c, h, _ in seen)
    assert "reg/ClipCov/selected_frac" in trainer.logged_metrics
    assert "reg/HighEntropyTokens/selected_frac" in trainer.logged_metrics
