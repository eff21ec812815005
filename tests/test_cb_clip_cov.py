"""`ClipCov` and the covariance maths it shares with `KLCov`: hand-computed covariance, strict bounds,
PPO-clipped and padded tokens, seeded random choice, batch vs micro-batch scope, and real fits.

Shapes: ``m`` sequences in the mini-batch, ``n`` in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from harness import make_view, short_fit
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback

from lit_entropy.callbacks.clip_cov import ClipCov, clip_cov_selection, selection_seed
from lit_entropy.callbacks.covariance import (
    clip_cov_candidates,
    ppo_clip_active,
    select_at_random,
    selection_count,
    token_covariance,
)
from lit_entropy.errors import ConfigError
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.regularizer import MinibatchView

# The 2 x 3 example: token (0, 2) is padding (its log-prob 50 would shift every mean if it were counted).
LOGPROBS = torch.tensor([[-1.0, -2.0, 50.0], [-1.5, -0.2, -3.0]])  # [2, 3]
ADVANTAGES = torch.tensor([1.0, -0.5])  # [2], broadcast per token
MASK = torch.tensor([[True, True, False], [True, True, True]])
# Kept lp: -1, -2, -1.5, -0.2, -3 -> mean -7.7 / 5 = -1.54.
# Kept A: 1, 1, -0.5, -0.5, -0.5 -> mean 0.5 / 5 = 0.1.
# cov = (lp + 1.54) * (A - 0.1):
#   (0, 0):  0.54 *  0.9 =  0.486     (0, 1): -0.46 *  0.9 = -0.414     (0, 2): padding -> 0
#   (1, 0):  0.04 * -0.6 = -0.024     (1, 1):  1.34 * -0.6 = -0.804     (1, 2): -1.46 * -0.6 = 0.876
EXPECTED_COV = torch.tensor([[0.486, -0.414, 0.0], [-0.024, -0.804, 0.876]])


def _example_view(**kwargs) -> MinibatchView:
    logprobs = LOGPROBS.clone().requires_grad_(True)
    return make_view(logprobs, ADVANTAGES, MASK, **kwargs)


def _state(callback: ClipCov) -> dict:
    return copy.deepcopy(vars(callback))


# --- pure maths --------------------------------------------------------------------------------------


def test_token_covariance_by_hand_with_padding():
    cov = token_covariance(LOGPROBS, ADVANTAGES[:, None].expand(2, 3), MASK)
    assert torch.allclose(cov, EXPECTED_COV, atol=1e-6)
    assert cov[0, 2].item() == 0.0  # padding: exactly 0, not (50 + 1.54) * 0.9
    # lp is detached: the covariance only ranks tokens and must not carry a gradient.
    assert not token_covariance(
        LOGPROBS.clone().requires_grad_(True), ADVANTAGES[:, None], MASK
    ).requires_grad


def test_token_covariance_of_nothing_kept_is_zero_not_nan():
    logprobs = torch.tensor([[float("nan"), float("-inf")]])
    cov = token_covariance(logprobs, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.equal(cov, torch.zeros(1, 2))


def test_candidate_bounds_are_strict():
    # lp [-1, -3, -1, -3] has mean -2 (centred: 1, -1, 1, -1); A [2, -1, -1, 0] has mean 0, so
    # cov = [1 * 2, -1 * -1, 1 * -1, -1 * 0] = [2, 1, -1, 0], all exact in binary floating point.
    logprobs = torch.tensor([[-1.0, -3.0, -1.0, -3.0]])
    advantages = torch.tensor([[2.0, -1.0, -1.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    cov = token_covariance(logprobs, advantages, mask)
    assert torch.equal(cov, torch.tensor([[2.0, 1.0, -1.0, 0.0]]))
    none_clipped = torch.zeros(1, 4, dtype=torch.bool)
    # cov == cov_lb (token 1) is not a candidate; only token 0 (1 < 2 < 5) is.
    assert clip_cov_candidates(cov, mask, none_clipped, 1.0, 5.0).tolist() == [[True, False, False, False]]
    # cov == cov_ub (token 0) is not a candidate either; token 1 (0.5 < 1 < 2) is.
    assert clip_cov_candidates(cov, mask, none_clipped, 0.5, 2.0).tolist() == [[False, True, False, False]]
    # The same through the callback (ratio 1 selects every candidate): selected tokens get weight 0.
    view = make_view(logprobs, advantages)
    weights = ClipCov(ratio=1.0, cov_lb=1.0, cov_ub=5.0).adjust(view).token_weights
    assert weights.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    weights = ClipCov(ratio=1.0, cov_lb=0.5, cov_ub=2.0).adjust(view).token_weights
    assert weights.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_ppo_clip_active_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    # ratios e^0.5 = 1.649, e^0.1 = 1.105, e^-0.5 = 0.607, e^-0.1 = 0.905
    logprobs = old + torch.tensor([[0.5, 0.1, -0.5, -0.1]])
    positive, negative = torch.ones(1, 4), -torch.ones(1, 4)
    # A > 0: clipped above 1.2 only (token 0); A < 0: clipped below 0.8 only (token 2).
    assert ppo_clip_active(logprobs, old, positive, 0.2, 0.2).tolist() == [[True, False, False, False]]
    assert ppo_clip_active(logprobs, old, negative, 0.2, 0.2).tolist() == [[False, False, True, False]]
    assert not ppo_clip_active(logprobs, old, torch.zeros(1, 4), 0.2, 0.2).any()  # A = 0 is never clipped
    assert not ppo_clip_active(logprobs, old, positive, 0.2, 1.0).any()  # 1.649 < 1 + 1


def test_selection_count_floors_keeps_at_least_one_and_survives_rounding():
    assert selection_count(0.5, 5) == 2  # floor(2.5)
    assert selection_count(2e-4, 5) == 1  # floor(0.001) = 0 -> at least 1
    assert selection_count(2e-4, 5000) == 1  # 2e-4 * 5000 must be 1, not floor(0.99999...) = 0
    assert selection_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in binary
    assert selection_count(1.0, 7) == 7
    assert selection_count(0.5, 0) == 0  # nothing kept: nothing to select


def test_random_choice_takes_count_of_candidates_uniformly():
    candidates = torch.tensor([[True, False, True], [False, True, False]])  # 3 candidates
    counts = torch.zeros(2, 3)
    draws = 3000
    for seed in range(draws):
        chosen = select_at_random(candidates, 1, torch.Generator().manual_seed(seed))
        assert int(chosen.sum()) == 1 and not (chosen & ~candidates).any()
        counts += chosen
    # Uniform: each candidate about 1/3 of the draws (binomial std ~ 0.009, so +-0.05 is > 5 std).
    assert torch.allclose(counts[candidates] / draws, torch.full((3,), 1 / 3), atol=0.05)
    two = select_at_random(candidates, 2, torch.Generator().manual_seed(0))
    assert int(two.sum()) == 2 and not (two & ~candidates).any()
    # Asking for more than there are takes all of them.
    assert torch.equal(select_at_random(candidates, 10, torch.Generator().manual_seed(0)), candidates)


def test_selection_seed_depends_on_every_part_and_nothing_else():
    base = selection_seed(0, 3, 1)
    assert base == selection_seed(0, 3, 1)
    assert len({base, selection_seed(1, 3, 1), selection_seed(0, 4, 1), selection_seed(0, 3, 2)}) == 4
    assert selection_seed(0, 1, 0) != selection_seed(0, 0, 1)  # order matters
    assert 0 <= base < 2**64


# --- the callback ------------------------------------------------------------------------------------


def test_padding_and_ppo_clipped_tokens_are_never_selected():
    old = LOGPROBS.clone()
    logprobs = (old + torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])).requires_grad_(True)
    view = make_view(logprobs, ADVANTAGES, MASK, old_logprobs=old)
    # Token (0, 0): A = 1 > 0, ratio e^0.5 = 1.65 > 1.2: clipped high. Token (1, 1): A = -0.5, ratio
    # e^-0.5 = 0.61 < 0.8: clipped low. Token (0, 2) is padding. Bounds wide enough for every other token,
    # ratio 1 -> max(floor(5), 1) = 5 >= 3 candidates: all three are selected.
    adjustment = ClipCov(ratio=1.0, cov_lb=-100.0, cov_ub=100.0).adjust(view)
    assert adjustment.token_weights.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert float(adjustment.metrics["candidates"]) == 3.0
    assert float(adjustment.metrics["selected_frac"]) == pytest.approx(3 / 5)
    # The clip range in force comes from the view: with eps_high = 1, token (0, 0) (ratio 1.65 < 2) is a
    # candidate again.
    wide = make_view(logprobs, ADVANTAGES, MASK, old_logprobs=old, eps_high=1.0)
    weights = ClipCov(ratio=1.0, cov_lb=-100.0, cov_ub=100.0).adjust(wide).token_weights
    assert weights.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_selected_token_loses_its_gradient_but_stays_in_the_normaliser():
    # On the 2 x 3 example only token (1, 2) (cov 0.876) is in (0.5, 5); ratio 2e-4 -> 1 token: it.
    logprobs = LOGPROBS.clone().requires_grad_(True)  # the leaf: the view holds logprobs[rows]
    view = make_view(logprobs, ADVANTAGES, MASK)
    callback = ClipCov(ratio=2e-4, cov_lb=0.5, cov_ub=5.0)
    adjustment = callback.adjust(view)
    assert adjustment.token_weights.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert float(adjustment.metrics["selected_cov"]) == pytest.approx(0.876, abs=1e-6)
    assert float(adjustment.metrics["selected_frac"]) == pytest.approx(1 / 5)
    result = microbatch_loss(Loss(), view, [callback], max_length=3)
    result.loss.backward()
    # On-policy, per-token loss -A: row 0 kept: -1, -1; row 1: 0.5, 0.5, (0.5 removed).
    # Token mean over all 5 kept tokens (not 4): (-2 + 1) / 5 = -0.2.
    assert result.loss.item() == pytest.approx(-0.2, abs=1e-7)
    # Gradient -A / 5 on the other kept tokens, exactly 0 on the selected token and the padding.
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.0]]))
    assert logprobs.grad[1, 2].item() == 0.0


def test_no_candidate_removes_nothing():
    adjustment = ClipCov(ratio=0.5, cov_lb=1.0, cov_ub=5.0).adjust(_example_view())  # max cov 0.876 < 1
    assert torch.equal(adjustment.token_weights, torch.ones(2, 3))
    assert float(adjustment.metrics["candidates"]) == 0.0
    assert float(adjustment.metrics["selected_cov"]) == 0.0


def test_random_choice_is_seeded_by_seed_iteration_and_update_only():
    generator = torch.Generator().manual_seed(1)
    logprobs = -3 * torch.rand(4, 8, generator=generator)  # [4, 8]
    advantages = torch.randn(4, generator=generator)
    callback = ClipCov(ratio=0.1, cov_lb=-1e9, cov_ub=1e9)  # every token a candidate; 3 of 32 chosen

    def weights(**kwargs) -> torch.Tensor:
        return callback.adjust(make_view(logprobs, advantages, **kwargs)).token_weights

    first = weights(iteration=2, update=1)
    assert int((first == 0).sum()) == 3  # floor(0.1 * 32)
    torch.manual_seed(1234)  # the global RNG plays no part
    assert torch.equal(weights(iteration=2, update=1), first)
    others = [weights(iteration=i, update=u) for i in range(3) for u in range(3)]
    assert sum(not torch.equal(w, first) for w in others) >= 7  # other (iteration, update): other tokens
    assert not torch.equal(
        ClipCov(ratio=0.1, cov_lb=-1e9, cov_ub=1e9, seed=7)
        .adjust(make_view(logprobs, advantages, iteration=2, update=1))
        .token_weights,
        first,
    )


def _two_level_minibatch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 sequences x 1 token whose covariance signs depend on where the means are taken.

    lp = [-0.5, -1.5, -2.5, -3.5], A = [1, -1, 1, -1].
    Whole mini-batch: mean lp -2, mean A 0: cov = [1.5, -0.5, -0.5, 1.5].
    Micro-batch rows 0-1: mean lp -1: cov = [0.5 * 1, -0.5 * -1] = [0.5, 0.5]; rows 2-3: mean -3: [0.5, 0.5].
    """
    return torch.tensor([[-0.5], [-1.5], [-2.5], [-3.5]]), torch.tensor([1.0, -1.0, 1.0, -1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_scope_selects_the_same_tokens_whole_or_split(seed):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(4, 6, generator=generator)  # [4, 6]
    advantages = torch.randn(4, generator=generator)
    mask = torch.rand(4, 6, generator=generator) > 0.2
    old = logprobs + 0.3 * torch.randn(4, 6, generator=generator)  # off-policy: some tokens clipped
    callback = ClipCov(ratio=0.25, cov_lb=-1e9, cov_ub=1e9, seed=seed)

    def weights(rows: slice, cb: ClipCov = callback) -> torch.Tensor:
        view = make_view(logprobs, advantages, mask, old_logprobs=old, rows=rows, iteration=5, update=3)
        return cb.adjust(view).token_weights

    whole = weights(slice(0, 4))
    assert torch.equal(torch.cat([weights(slice(0, 2)), weights(slice(2, 4))]), whole)
    # max(floor(0.25 * n), 1) of the candidates (kept tokens whose clip is inactive), all if fewer
    clipped = ppo_clip_active(logprobs, old, advantages[:, None].expand(4, 6), 0.2, 0.2)
    candidates = int((mask & ~clipped).sum())
    assert int((whole == 0).sum()) == min(int(mask.sum()) // 4, candidates) > 0


def test_microbatch_scope_centres_per_microbatch_and_may_differ():
    logprobs, advantages = _two_level_minibatch()
    for scope, expected in (("batch", [0.0, 1.0, 1.0, 0.0]), ("microbatch", [0.0, 0.0, 0.0, 0.0])):
        callback = ClipCov(ratio=1.0, cov_lb=0.0, cov_ub=5.0, scope=scope)  # positive covariance only
        split = [
            callback.adjust(make_view(logprobs, advantages, rows=rows)).token_weights
            for rows in (slice(0, 2), slice(2, 4))
        ]
        assert torch.cat(split).squeeze(1).tolist() == expected, scope


def test_batch_scope_without_minibatch_stats_names_the_missing_fields():
    view = make_view(LOGPROBS, ADVANTAGES, MASK)
    bare = MinibatchView(**{**vars(view), "minibatch_logprobs": None, "minibatch_entropy": None})
    with pytest.raises(ValueError, match=r"ClipCov\(scope='batch'\) needs the view's \['minibatch_logprobs'"):
        ClipCov().adjust(bare)
    assert ClipCov(scope="microbatch").adjust(bare).token_weights.shape == (2, 3)  # needs no stats


def test_adjust_does_not_change_state():
    callback = ClipCov(ratio=0.5, cov_lb=-10.0, cov_ub=10.0)
    before, state_before = _state(callback), callback.state_dict()
    for update in range(3):
        callback.adjust(_example_view(update=update))
    assert _state(callback) == before
    assert callback.state_dict() == state_before == {}  # stateless: nothing for a checkpoint to carry


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"ClipCov.ratio must be a fraction in \(0, 1\], got 0.0"),
        ({"ratio": -1e-4}, r"ClipCov.ratio .* got -0.0001"),
        ({"ratio": 1.5}, r"ClipCov.ratio .* got 1.5"),
        ({"ratio": float("nan")}, r"ClipCov.ratio .* got nan"),
        ({"cov_lb": 5.0, "cov_ub": 5.0}, r"ClipCov.cov_lb must be < cov_ub, got cov_lb=5.0, cov_ub=5.0"),
        ({"cov_lb": 6.0}, r"cov_lb=6.0, cov_ub=5.0"),
        ({"scope": "global"}, r"ClipCov.scope must be one of \['batch', 'microbatch'\], got 'global'"),
        ({"seed": 1.5}, r"ClipCov.seed must be an integer, got 1.5"),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClipCov(**kwargs)


def test_constructible_from_yaml_with_validated_choices():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(
        "callbacks:\n"
        "  - class_path: lit_entropy.callbacks.clip_cov.ClipCov\n"
        "    init_args: {ratio: 0.001, cov_lb: -1.0, scope: microbatch, seed: 3}\n"
    )
    (callback,) = parser.instantiate_classes(config).callbacks
    assert isinstance(callback, ClipCov)
    assert (callback.ratio, callback.cov_lb, callback.cov_ub, callback.scope, callback.seed) == (
        0.001,
        -1.0,
        5.0,
        "microbatch",
        3,
    )
    assert callback.needs_minibatch_stats is False  # micro-batch scope spares the mini-batch forward
    with pytest.raises(Exception, match="batch"):
        parser.parse_string(
            "callbacks:\n"
            "  - class_path: lit_entropy.callbacks.clip_cov.ClipCov\n"
            "    init_args: {scope: all}\n"
        )


# --- real fits ---------------------------------------------------------------------------------------


class RecordingClipCov(ClipCov):
    """Keeps every view and adjustment it produced (test-only; the real class stores nothing)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[MinibatchView, torch.Tensor]] = []

    @property
    def name(self) -> str:
        return "ClipCov"  # log under the real class's namespace

    def adjust(self, view):
        adjustment = super().adjust(view)
        self.calls.append((view, adjustment.token_weights))
        return adjustment


def test_fit_selects_over_the_minibatch_and_logs_metrics(tiny_model_dir, tmp_path):
    callback = RecordingClipCov(ratio=0.1, cov_lb=-1e3, cov_ub=1e3, seed=3)
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path, [callback], ppo_epochs=2, minibatch_size=4, microbatch_size=2
    )
    # 2 iterations x 2 epochs x 2 mini-batches x 2 micro-batches.
    assert len(callback.calls) == 16
    by_update: dict[tuple[int, int], list] = {}
    for view, weights in callback.calls:
        by_update.setdefault((view.iteration, view.update), []).append((view, weights))
    assert sorted(by_update) == [(i, u) for i in range(2) for u in range(4)]
    for (iteration, update), calls in by_update.items():
        (first, w0), (second, w1) = calls
        assert (first.microbatch_rows, second.microbatch_rows) == (slice(0, 2), slice(2, 4))
        assert torch.equal(first.minibatch_logprobs, second.minibatch_logprobs)
        # The two micro-batches' weights are the rows of one selection made over the whole mini-batch.
        selection = clip_cov_selection(
            first.minibatch_logprobs,
            first.minibatch_old_logprobs,
            first.minibatch_advantages,
            first.minibatch_mask,
            ratio=0.1,
            cov_lb=-1e3,
            cov_ub=1e3,
            eps_low=0.2,
            eps_high=0.2,
            generator=torch.Generator().manual_seed(selection_seed(3, iteration, update)),
        )
        assert torch.equal(torch.cat([w0, w1]), (~selection.selected).float())
        assert int(selection.selected.sum()) >= 1
    for key in ("selected_frac", "selected_cov", "candidates"):
        assert f"reg/ClipCov/{key}" in trainer.logged_metrics
    assert 0.0 < trainer.logged_metrics["reg/ClipCov/selected_frac"].item() <= 0.5
    assert trainer.logged_metrics["reg/ClipCov/candidates"].item() >= 1.0


def test_resumed_fit_continues_the_seeded_selection(tiny_model_dir, tmp_path: Path):
    updates = 4  # ppo_epochs 2 x 2 mini-batches
    grpo = {"ppo_epochs": 2, "minibatch_size": 4, "microbatch_size": 2}
    first = ClipCov(ratio=0.1, cov_lb=-1e3, cov_ub=1e3)
    short_fit(tiny_model_dir, tmp_path, [first], iterations=1, checkpoint=True, **grpo)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert first.state_key not in saved["callbacks"]  # stateless: nothing stored, nothing to restore

    resumed = RecordingClipCov(ratio=0.1, cov_lb=-1e3, cov_ub=1e3)
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path / "resumed", [resumed], iterations=2, ckpt_path=str(checkpoint), **grpo
    )
    assert trainer.global_step == 2 * updates
    # Only the second iteration ran, and its selection is seeded with iteration 1, as without the restart.
    assert sorted({(view.iteration, view.update) for view, _ in resumed.calls}) == [(1, u) for u in range(4)]
    assert "reg/ClipCov/selected_frac" in trainer.logged_metrics
