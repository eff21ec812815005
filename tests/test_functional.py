"""Tests of the pure loss maths against hand computations and naive reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lit_entropy.errors import ConfigError
from lit_entropy.functional import (
    aggregate_loss,
    clipped_surrogate,
    equal_reward_groups,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
)
from lit_entropy.logprobs import token_logprobs_and_entropy

# ----------------------------------------------------------------------------------------------------------
# masked_sum / masked_mean


def test_masked_sum_and_mean_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # kept: 1 + 2 = 3 over 2 entries -> mean 1.5
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask).item() == 1.5
    # per row: row 0 -> sum 3, mean 1.5; row 1 has nothing kept -> sum 0, mean 0 (not NaN)
    assert masked_sum(x, mask, dim=1).tolist() == [3.0, 0.0]
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    # per column: col 0 -> 1/1, col 1 -> 2/1, col 2 -> nothing -> 0
    assert masked_mean(x, mask, dim=0).tolist() == [1.0, 2.0, 0.0]
    # float mask gives the same answer as bool
    assert masked_mean(x, mask.float()).item() == 1.5


def test_masked_mean_empty_mask_is_zero_with_finite_grad() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = masked_mean(x, mask)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_masked_reductions_ignore_nan_at_padding() -> None:
    # a NaN / -inf at a padded position must not leak into the value or the gradient (0 * nan = nan)
    x = torch.tensor([[2.0, float("nan")], [4.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = masked_mean(x, mask)  # (2 + 4) / 2 = 3
    assert out.item() == 3.0
    out.backward()
    # d mean / d x = 1/2 on kept entries, 0 elsewhere
    assert torch.equal(x.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


# ----------------------------------------------------------------------------------------------------------
# group_advantages / equal_reward_groups

# Two groups of G=4: [1, 0, 0, 1] and [0, 0, 0, 0].
# Group 1: mean 0.5, deviations +-0.5, unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.5773503.
# Batch (all 8): mean 0.25, sum of squared deviations = 2 * 0.75^2 + 6 * 0.25^2 = 1.5,
#   unbiased var = 1.5 / 7, std = 0.4629100.
# RLOO in group 1: r=1 -> others [0, 0, 1] mean 1/3 -> A = 2/3; r=0 -> others [1, 0, 1] mean 2/3 -> A = -2/3.
# Group 2 is all-equal -> A = 0 in every mode/scale.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
SIGN = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
GROUP_STD = math.sqrt(1 / 3)
BATCH_STD = math.sqrt(1.5 / 7)
EPS = 1e-6


@pytest.mark.parametrize(
    ("mode", "scale", "magnitude"),
    [
        ("grpo", "group", 0.5 / (GROUP_STD + EPS)),  # 0.8660239
        ("grpo", "batch", 0.5 / (BATCH_STD + EPS)),  # 1.0801211
        ("grpo", "none", 0.5),
        ("rloo", "group", (2 / 3) / (GROUP_STD + EPS)),  # 1.1546985
        ("rloo", "batch", (2 / 3) / (BATCH_STD + EPS)),  # 1.4401615
        ("rloo", "none", 2 / 3),
        # dr_grpo ignores scale
        ("dr_grpo", "group", 0.5),
        ("dr_grpo", "batch", 0.5),
        ("dr_grpo", "none", 0.5),
    ],
)
def test_group_advantages_by_hand(mode: str, scale: str, magnitude: float) -> None:
    adv = group_advantages(REWARDS, group_size=4, mode=mode, scale=scale, eps=EPS)
    assert adv.dtype == torch.float32
    assert adv.shape == (8,)
    torch.testing.assert_close(adv, SIGN * magnitude, rtol=1e-6, atol=1e-7)
    # the all-equal group is exactly zero, not merely small
    assert torch.equal(adv[4:], torch.zeros(4))


def test_rloo_identity_on_random_rewards() -> None:
    # A_rloo = r - (sum - r)/(G-1) = G/(G-1) * (r - mean)  for every group
    g = 5
    rewards = torch.randn(6 * g, generator=torch.Generator().manual_seed(0))
    rloo = group_advantages(rewards, g, mode="rloo", scale="none")
    grpo = group_advantages(rewards, g, mode="grpo", scale="none")
    torch.testing.assert_close(rloo, g / (g - 1) * grpo)
    # independent naive baseline per element
    naive = torch.stack(
        [
            rewards[i] - torch.cat([rewards[(i // g) * g : i], rewards[i + 1 : (i // g + 1) * g]]).mean()
            for i in range(rewards.numel())
        ]
    )
    torch.testing.assert_close(rloo, naive)


def test_all_equal_group_is_exactly_zero_despite_rounding() -> None:
    # In fp32, mean([x, x, x]) != x for these x: r - mean leaves a residual of 6e-8 / -3e-8, which the
    # naive (r - mean) / (std + 1e-6) turns into spurious advantages of 0.0596 / -0.0298.
    x, y = 0.9747456312179565, 0.49819666147232056
    rewards = torch.tensor([x, x, x, y, y, y])
    naive = rewards.view(2, 3) - rewards.view(2, 3).mean(dim=1, keepdim=True)
    assert (naive != 0).all()  # the hazard is real on this input
    for mode in ("grpo", "rloo", "dr_grpo"):
        for scale in ("group", "batch", "none"):
            adv = group_advantages(rewards, 3, mode=mode, scale=scale)
            assert torch.equal(adv, torch.zeros(6)), (mode, scale)


def test_group_advantages_accepts_int_rewards_and_detaches() -> None:
    adv = group_advantages(torch.tensor([1, 0, 1, 0]), 2, scale="none")
    # groups [1, 0], [1, 0]: mean 0.5 -> +-0.5
    assert adv.tolist() == [0.5, -0.5, 0.5, -0.5]
    assert not group_advantages(torch.rand(4, requires_grad=True), 2).requires_grad


@pytest.mark.parametrize(("n", "group_size"), [(8, 3), (8, 1), (8, 0), (5, 2)])
def test_group_advantages_bad_group_size(n: int, group_size: int) -> None:
    with pytest.raises(ConfigError, match=rf"group_size={group_size}.*N={n}|N={n}.*group_size={group_size}"):
        group_advantages(torch.zeros(n), group_size)
    with pytest.raises(ConfigError, match="group_size"):
        equal_reward_groups(torch.zeros(n), group_size)


def test_group_advantages_bad_mode_and_scale() -> None:
    with pytest.raises(ConfigError, match="mode='ppo'"):
        group_advantages(REWARDS, 4, mode="ppo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="scale='std'"):
        group_advantages(REWARDS, 4, scale="std")  # type: ignore[arg-type]


def test_equal_reward_groups() -> None:
    # groups: [1,0,0,1] varied, [0,0,0,0] equal
    assert equal_reward_groups(REWARDS, 4).tolist() == [False, True]
    # groups of 2: [1,0] [0,1] [0,0] [0,0]
    assert equal_reward_groups(REWARDS, 2).tolist() == [False, False, True, True]
    # exact equality: [0.3, 0.3+1e-6] is not an all-equal group; [2, 2] is
    out = equal_reward_groups(torch.tensor([0.3, 0.3 + 1e-6, 2.0, 2.0]), 2)
    assert out.dtype == torch.bool and out.tolist() == [False, True]


# ----------------------------------------------------------------------------------------------------------
# token_logprobs_and_entropy


def _naive_logprobs_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """Independent float64 reference: p = softmax(z), logprob = log p[token], H = -sum p log p."""
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    logp = torch.log(p)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(p * logp).sum(-1)
    return lp, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logprobs_entropy_match_naive(dtype: torch.dtype, temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 11, generator=gen)).to(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=temperature)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == (3, 5) and ent.shape == (3, 5)
    # the reference is computed from the same (already rounded) input values, so fp32 accuracy is expected
    ref_lp, ref_ent = _naive_logprobs_entropy(logits, tokens, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (ent >= 0).all() and (ent <= math.log(11) + 1e-5).all()


def test_temperature_is_applied_before_softmax() -> None:
    # logits [0, log 3] at T=1: p = [1/4, 3/4]; at T=0.5 (z = [0, 2 log 3]): p = [1/10, 9/10].
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    lp1, ent1 = token_logprobs_and_entropy(logits, tokens, temperature=1.0)
    lp2, ent2 = token_logprobs_and_entropy(logits, tokens, temperature=0.5)
    assert lp1.item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    assert lp2.item() == pytest.approx(math.log(9 / 10), abs=1e-6)
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351; -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.3250830
    assert ent1.item() == pytest.approx(0.5623351, abs=1e-6)
    assert ent2.item() == pytest.approx(0.3250830, abs=1e-6)


def test_uniform_logits_give_log_v() -> None:
    v = 50
    logits = torch.full((2, 3, v), 7.5, dtype=torch.bfloat16)
    tokens = torch.randint(0, v, (2, 3))
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.9)
    # uniform over V: every log-prob is -log V and the entropy is log V = 3.912023 nats
    torch.testing.assert_close(ent, torch.full((2, 3), math.log(v)), rtol=0, atol=1e-5)
    torch.testing.assert_close(lp, torch.full((2, 3), -math.log(v)), rtol=0, atol=1e-5)


def test_neg_inf_logits_are_zero_probability_not_nan() -> None:
    # [0, 0, -inf, -inf]: uniform over 2 tokens -> H = log 2, logprob of token 1 = -log 2
    logits = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert ent.item() == pytest.approx(math.log(2), abs=1e-6)
    assert lp.item() == pytest.approx(-math.log(2), abs=1e-6)
    (lp + ent).sum().backward()
    assert torch.isfinite(logits.grad).all()


def _grads(logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int, w_lp, w_ent, temperature=1.0):
    leaf = logits.detach().clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(leaf, tokens, temperature=temperature, chunk_size=chunk_size)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_gives_same_values_and_gradients(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(2, 5, 13, generator=gen)).to(dtype)
    tokens = torch.randint(0, 13, (2, 5), generator=gen)
    w_lp, w_ent = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    # N*T = 10 rows: chunks of 3 (uneven: 3+3+3+1), of 1, and one chunk of everything
    whole = _grads(logits, tokens, 4096, w_lp, w_ent, temperature=0.8)
    for chunk_size in (3, 1):
        parts = _grads(logits, tokens, chunk_size, w_lp, w_ent, temperature=0.8)
        for a, b in zip(whole, parts, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert whole[2].dtype == dtype


def test_gradients_flow_through_both_outputs_and_match_naive() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 9, generator=gen)
    tokens = torch.randint(0, 9, (2, 4), generator=gen)
    w_lp, w_ent = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    for only in ("lp", "ent"):
        wl = w_lp if only == "lp" else torch.zeros(2, 4)
        we = w_ent if only == "ent" else torch.zeros(2, 4)
        _, _, grad = _grads(logits, tokens, 3, wl, we, temperature=1.2)
        ref = logits.double().clone().requires_grad_(True)
        ref_lp, ref_ent = _naive_logprobs_entropy(ref, tokens, 1.2)
        ((ref_lp * wl.double()).sum() + (ref_ent * we.double()).sum()).backward()
        assert grad.abs().sum() > 0, only
        torch.testing.assert_close(grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_path_and_no_full_fp32_logits_saved_for_backward() -> None:
    gen = torch.Generator().manual_seed(4)
    n, t, v, chunk = 2, 8, 64, 4
    logits = torch.randn(n, t, v, generator=gen, dtype=torch.bfloat16)
    tokens = torch.randint(0, v, (n, t), generator=gen)
    with torch.no_grad():
        lp, ent = token_logprobs_and_entropy(logits, tokens, chunk_size=chunk)
    assert lp.grad_fn is None and ent.grad_fn is None

    # Record every tensor autograd keeps for backward during the forward: no fp32 [rows, V] block may be
    # kept (each chunk is recomputed in backward), so the fp32 bytes kept stay far below one chunk's.
    saved_fp32_numel = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal saved_fp32_numel
        if x.dtype == torch.float32:
            saved_fp32_numel += x.numel()
        return x

    leaf = logits.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp_g, ent_g = token_logprobs_and_entropy(leaf, tokens, chunk_size=chunk)
    assert saved_fp32_numel < chunk * v
    torch.testing.assert_close(lp_g.detach(), lp)
    torch.testing.assert_close(ent_g.detach(), ent)
    (lp_g.sum() + ent_g.sum()).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()


def test_logprobs_entropy_bad_input() -> None:
    logits = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        token_logprobs_and_entropy(logits, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs_and_entropy(logits, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ConfigError, match="temperature=0"):
        token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]), temperature=0)
    with pytest.raises(ConfigError, match="chunk_size=0"):
        token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]), chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# clipped_surrogate

# eps_low = eps_high = 0.2 -> ratio clamp [0.8, 1.2]. Per token, loss = max(-A*r, -A*clamp(r)):
#   A=+1, r=1.1: max(-1.1, -1.1) = -1.1, d/dlp = -A*r = -1.1
#   A=+1, r=1.5: max(-1.5, -1.2) = -1.2, clipped_high, d/dlp = 0
#   A=+1, r=0.5: max(-0.5, -0.8) = -0.5, not clipped (pessimistic branch), d/dlp = -0.5
#   A=-1, r=0.9: max( 0.9,  0.9) =  0.9, d/dlp = 0.9
#   A=-1, r=0.5: max( 0.5,  0.8) =  0.8, clipped_low, d/dlp = 0
#   A=-1, r=1.5: max( 1.5,  1.2) =  1.5, not clipped, d/dlp = 1.5
#   A=-2, r=1.5: max( 3.0,  2.4) =  3.0, d/dlp = 2 * 1.5 = 3.0
#   A= 0, r=1.5: 0, no clip, d/dlp = 0
CASES_A = torch.tensor([[1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, -2.0, 0.0]])
CASES_R = torch.tensor([[1.1, 1.5, 0.5, 0.9], [0.5, 1.5, 1.5, 1.5]])
CASES_LOSS = torch.tensor([[-1.1, -1.2, -0.5, 0.9], [0.8, 1.5, 3.0, 0.0]])
CASES_GRAD = torch.tensor([[-1.1, 0.0, -0.5, 0.9], [0.0, 1.5, 3.0, 0.0]])


def _logprobs_for_ratio(ratio: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return (old + torch.log(ratio)).requires_grad_(True)


def test_clipped_surrogate_by_hand() -> None:
    old = torch.full((2, 4), -1.3)
    lp = _logprobs_for_ratio(CASES_R, old)
    loss, low, high = clipped_surrogate(lp, old, CASES_A)
    torch.testing.assert_close(loss, CASES_LOSS, rtol=1e-5, atol=1e-6)
    assert low.dtype == torch.bool and high.dtype == torch.bool
    assert high.tolist() == [[False, True, False, False], [False, False, False, False]]
    assert low.tolist() == [[False, False, False, False], [True, False, False, False]]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, CASES_GRAD, rtol=1e-5, atol=1e-6)
    # gradient is exactly zero wherever a clip mask is set
    assert (lp.grad[low | high] == 0).all()


def test_clip_higher_is_decoupled() -> None:
    # A=+1, r=1.25: symmetric 0.2 clips (loss -1.2, grad 0); DAPO eps_high=0.28 does not (loss -1.25).
    # A=-1, r=0.75: lower clip eps_low=0.2 is active in both (loss max(0.75, 0.8) = 0.8).
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    lp = _logprobs_for_ratio(torch.tensor([[1.25, 0.75]]), old)
    loss, low, high = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8]]))
    assert high.tolist() == [[True, False]] and low.tolist() == [[False, True]]
    loss, low, high = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.8]]))
    assert high.tolist() == [[False, False]] and low.tolist() == [[False, True]]


def test_dual_clip_caps_negative_advantage_loss() -> None:
    # c = 3, clip range [0.8, 1.2]:
    #   A=-1, r=5: max(5, 1.2) = 5 -> min(5, 3) = 3, grad 0
    #   A=-1, r=2: max(2, 1.2) = 2 -> min(2, 3) = 2, grad 2
    #   A=-2, r=4: max(8, 2.4) = 8 -> min(8, 6) = 6, grad 0
    #   A=+1, r=5: max(-5, -1.2) = -1.2 (dual clip does not apply to A > 0), grad 0
    old = torch.zeros(1, 4)
    adv = torch.tensor([[-1.0, -1.0, -2.0, 1.0]])
    lp = _logprobs_for_ratio(torch.tensor([[5.0, 2.0, 4.0, 5.0]]), old)
    loss, low, high = clipped_surrogate(lp, old, adv, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, 6.0, -1.2]]))
    # dual-clip activation is not part of the masks
    assert low.tolist() == [[False, False, False, False]]
    assert high.tolist() == [[False, False, False, True]]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    # without the dual clip the first token would cost 5
    loss_plain, _, _ = clipped_surrogate(lp, old, adv)
    torch.testing.assert_close(loss_plain, torch.tensor([[5.0, 2.0, 8.0, -1.2]]))


def test_on_policy_ratio_is_exactly_one() -> None:
    gen = torch.Generator().manual_seed(5)
    lp = (-5 * torch.rand(4, 7, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    adv = torch.randn(4, 1, generator=gen).expand(4, 7)
    loss, low, high = clipped_surrogate(lp, lp.detach(), adv)
    # exp(0) = 1 exactly: loss = -A, nothing clipped, and d loss / d lp = -A * 1
    assert loss.dtype == torch.float32
    assert torch.equal(loss, -adv)
    assert not low.any() and not high.any()
    loss.sum().backward()
    torch.testing.assert_close(lp.grad.float(), -adv.to(torch.bfloat16).float())


def test_clipped_surrogate_bad_config() -> None:
    x = torch.zeros(1, 1)
    with pytest.raises(ConfigError, match="dual_clip=1.0"):
        clipped_surrogate(x, x, x, dual_clip=1.0)
    with pytest.raises(ConfigError, match="eps_low=-0.1"):
        clipped_surrogate(x, x, x, eps_low=-0.1)
    with pytest.raises(ConfigError, match="eps_high=-1"):
        clipped_surrogate(x, x, x, eps_high=-1)
    with pytest.raises(ValueError, match="old_logprobs"):
        clipped_surrogate(x, torch.zeros(1, 2), x)


# ----------------------------------------------------------------------------------------------------------
# kl_penalty


def test_kl_estimators_by_hand() -> None:
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    # d = ref - lp = [-0.5, 1.0, 0.0]
    # k1 = lp - ref = [0.5, -1.0, 0.0]
    # k2 = 0.5 * d^2 = [0.125, 0.5, 0.0]
    # k3 = e^d - d - 1 = [e^-0.5 + 0.5 - 1, e - 2, 0] = [0.1065307, 0.7182818, 0.0]
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([[0.1065307, 0.7182818, 0.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref), kl_penalty(lp, ref, "k3"))


def test_k3_is_nonnegative_finite_and_accurate_near_zero() -> None:
    gen = torch.Generator().manual_seed(6)
    lp = torch.cat([-10 * torch.rand(100, generator=gen), torch.tensor([-200.0, 0.0, -1e-4])]).unsqueeze(0)
    ref = torch.cat([-10 * torch.rand(100, generator=gen), torch.tensor([0.0, -200.0, 0.0])]).unsqueeze(0)
    k3 = kl_penalty(lp, ref, "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    # beyond the +-20 clamp: d = 200 -> e^20 - 21; d = -200 -> e^-20 + 19
    assert k3[0, 100].item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    assert k3[0, 101].item() == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    # d = 1e-4: e^d - d - 1 = d^2/2 + d^3/6 = 5.0001667e-9 (cancellation would give 0 or ~1e-8 noise in fp32)
    assert k3[0, 102].item() == pytest.approx(5.0001667e-9, rel=1e-3)
    # k2 >= 0 too, k1 is signed
    assert (kl_penalty(lp, ref, "k2") >= 0).all()


def test_kl_gradient_k3() -> None:
    # d k3 / d lp = d/d lp [e^(ref-lp) - (ref-lp) - 1] = -e^(ref-lp) + 1; at lp=-1, ref=-1.5: 1 - e^-0.5
    lp = torch.tensor([[-1.0]], requires_grad=True)
    kl_penalty(lp, torch.tensor([[-1.5]]), "k3").sum().backward()
    assert lp.grad.item() == pytest.approx(1 - math.exp(-0.5), abs=1e-6)


def test_kl_bad_estimator() -> None:
    with pytest.raises(ConfigError, match="estimator='k4'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# aggregate_loss

# 2x3 example; 100 sits at padded positions and must never count.
LOSS_2X3 = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
MASK_2X3 = torch.tensor([[True, True, False], [True, False, False]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3 kept tokens
        ("seq-mean-token-mean", 2.75),  # ((1 + 2)/2 + 4/1) / 2 = (1.5 + 4) / 2
        ("seq-mean-token-sum", 3.5),  # ((1 + 2) + 4) / 2
        ("seq-mean-token-sum-norm", 7 / 6),  # 7 / (2 sequences * 3 max length)
    ],
)
def test_aggregate_loss_by_hand(mode: str, expected: float) -> None:
    out = aggregate_loss(LOSS_2X3, MASK_2X3, mode)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # a float mask gives the same
    assert aggregate_loss(LOSS_2X3, MASK_2X3.float(), mode).item() == pytest.approx(expected, rel=1e-6)


def test_aggregate_loss_explicit_normalisers_by_hand() -> None:
    # token-mean with num_tokens=14: 7 / 14 = 0.5
    assert aggregate_loss(LOSS_2X3, MASK_2X3, num_tokens=14).item() == pytest.approx(0.5)
    # seq-mean-token-sum with num_sequences=7: 7 / 7 = 1
    assert aggregate_loss(LOSS_2X3, MASK_2X3, "seq-mean-token-sum", num_sequences=7).item() == 1.0
    # sum-norm with num_sequences=4, max_length=7: 7 / 28 = 0.25
    out = aggregate_loss(LOSS_2X3, MASK_2X3, "seq-mean-token-sum-norm", num_sequences=4, max_length=7)
    assert out.item() == pytest.approx(0.25)
    # tensor normalisers work the same as numbers
    assert aggregate_loss(LOSS_2X3, MASK_2X3, num_tokens=torch.tensor(14)).item() == pytest.approx(0.5)


def test_aggregate_loss_gradient_token_mean() -> None:
    loss = LOSS_2X3.clone().requires_grad_(True)
    aggregate_loss(loss, MASK_2X3).backward()
    # d/dL of sum(L*M)/3 = M/3
    torch.testing.assert_close(loss.grad, MASK_2X3.float() / 3)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_aggregate_loss_microbatch_invariance(mode: str) -> None:
    gen = torch.Generator().manual_seed(7)
    t = 6
    loss = torch.randn(4, t, generator=gen)
    lengths = torch.tensor([6, 1, 3, 0])  # includes an empty sequence
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [4, T]
    whole = aggregate_loss(loss, mask, mode)
    global_norm = {"num_tokens": mask.sum(), "num_sequences": 4, "max_length": t}
    parts = sum(aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, **global_norm) for i in (0, 2))
    torch.testing.assert_close(parts, whole)
    # and it is not a trivial identity: local normalisers would give a different sum
    local = sum(aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode) for i in (0, 2))
    assert not torch.allclose(local, whole)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_aggregate_loss_empty_minibatch_is_connected_zero(mode: str) -> None:
    loss = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    kwargs = {"num_tokens": 0} if mode == "token-mean" else {"num_sequences": 0}
    out = aggregate_loss(loss, mask, mode, **kwargs)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(1, 2))
    # default token-mean normaliser of an all-padding call is 0 as well
    assert aggregate_loss(loss, mask).item() == 0.0


def test_aggregate_loss_bad_input() -> None:
    with pytest.raises(ConfigError, match="mode='mean'"):
        aggregate_loss(LOSS_2X3, MASK_2X3, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        aggregate_loss(LOSS_2X3, MASK_2X3[:, :2])
    with pytest.raises(ConfigError, match="num_tokens=-1"):
        aggregate_loss(LOSS_2X3, MASK_2X3, num_tokens=-1)
    with pytest.raises(ConfigError, match="max_length=0"):
        aggregate_loss(LOSS_2X3, MASK_2X3, "seq-mean-token-sum-norm", max_length=0)
