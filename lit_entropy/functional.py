"""Pure tensor maths for the RL loss: masked reductions, advantages, the clipped surrogate, KL estimators and
loss aggregation (log-probs and entropy from logits are in `lit_entropy.logprobs`).

Nothing here holds state, touches an ``nn.Module`` or knows about Lightning; every function maps tensors
to tensors so it can be tested on tiny hand-computed examples.

Shape letters: ``B`` prompts, ``G`` completions per prompt (group size), ``N = B*G`` sequences, ``T``
completion length (padded), ``V`` vocabulary. Masks are keep-masks (``True``/``1`` = a real token).
Log-probabilities and entropies are in nats.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError

AdvantageMode = Literal["grpo", "dr_grpo", "rloo"]
AdvantageScale = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]

__all__ = [
    "AdvantageMode",
    "AdvantageScale",
    "KLEstimator",
    "LossAggregation",
    "aggregate_loss",
    "clipped_surrogate",
    "equal_reward_groups",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "sequence_log_ratio",
    "truncated_importance_weights",
]

# Bound on |ref - lp| inside the k3 estimator: exp(20) ~ 4.9e8 is still finite in fp32 (and bf16), while a
# policy that drifted further than that from the reference on one token should not produce inf/NaN.
_K3_LOG_RATIO_BOUND = 20.0


def _check_choice(name: str, value: str, literal: object) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def _check_same_shape(**tensors: Tensor) -> None:
    # Shape mismatches here are programming errors in the caller, not user configuration, hence ValueError.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed} must all have the same shape")


def _masked_values(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` with masked-out entries forced to an exact 0.

    ``where`` instead of a bare product keeps NaN/inf at padded positions (e.g. the log-prob of a pad token
    under a -inf logit) from leaking into sums and gradients: ``0 * nan`` is ``nan``.
    """
    if mask.dtype == torch.bool:
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    weights = mask.to(x.dtype)
    return torch.where(weights != 0, x * weights, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the entries kept by ``mask``.

    Args:
        x: values, any shape (e.g. ``[N, T]``), floating point.
        mask: keep-mask broadcastable to ``x``; bool, or float weights (``0`` drops the entry).
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked sum, ``x``'s shape without ``dim`` (scalar when ``dim`` is ``None``).
    """
    values = _masked_values(x, mask)
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries kept by ``mask``; an all-False mask gives 0, not NaN.

    Args:
        x: values, any shape (e.g. ``[N, T]``), floating point.
        mask: keep-mask broadcastable to ``x``; bool, or float weights (a weighted mean).
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked mean, ``x``'s shape without ``dim`` (scalar when ``dim`` is ``None``).
    """
    x, mask = torch.broadcast_tensors(x, mask)
    total = masked_sum(x, mask, dim)
    weights = mask.to(x.dtype)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    # Divide by 1 where nothing is kept (total is exactly 0 there): a 0/0 would put NaN in the backward
    # pass even if the forward value were patched afterwards.
    safe_count = torch.where(count != 0, count, torch.ones_like(count))
    return total / safe_count


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """View ``rewards [N]`` as ``[B, G]`` after checking the group layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 2:
        raise ConfigError(
            f"group_size={group_size} must be >= 2 (N={n}): a group of one has no baseline to compare with"
        )
    if n % group_size != 0:
        raise ConfigError(
            f"N={n} rewards cannot be split into groups of group_size={group_size} ({n} % {group_size} != 0)"
        )
    return rewards.reshape(n // group_size, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    mode: AdvantageMode = "grpo",
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages from rewards, baselined within each prompt's group.

    ``rewards`` is laid out group-contiguous: rows ``i*G .. i*G+G-1`` are the ``G`` completions of prompt
    ``i``.

    - ``grpo``: ``A = r - mean_g(r)``.
    - ``rloo``: ``A = r - mean of the other G-1 rewards of the group`` (``= G/(G-1) * (r - mean_g(r))``).
    - ``dr_grpo``: as ``grpo`` but never scaled (``scale`` is ignored and treated as ``"none"``).

    Scaling: ``"group"`` divides by (unbiased std of the group + ``eps``), ``"batch"`` by (unbiased std of
    all ``N`` rewards + ``eps``), ``"none"`` does not divide.

    Groups whose rewards are all exactly equal get advantages of exactly 0 in every mode: the centring
    ``r - mean`` can leave a rounding residual (e.g. ``0.1`` repeated), which a division by ``0 + eps``
    would blow up to a spurious O(1e-2) advantage.

    Args:
        rewards: ``[N]`` scalar rewards, ``N = B*G``.
        group_size: ``G``, completions per prompt (>= 2).
        mode: baseline, see above.
        scale: std normalisation, see above.
        eps: added to the std before dividing.

    Returns:
        ``[N]`` float32 advantages.

    Raises:
        ConfigError: ``group_size < 2``, ``N`` not a multiple of ``group_size``, or an unknown
            ``mode``/``scale``.
    """
    _check_choice("mode", mode, AdvantageMode)
    _check_choice("scale", scale, AdvantageScale)
    r = _groups(rewards.detach().to(torch.float32), group_size)  # [B, G]
    if mode == "dr_grpo":
        scale = "none"

    mean = r.mean(dim=1, keepdim=True)  # [B, 1]
    if mode == "rloo":
        # Mean of the other G-1 rewards, written as the definition rather than the G/(G-1) identity.
        others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # [B, G]
        adv = r - others_mean
    else:
        adv = r - mean  # [B, G]

    if scale == "group":
        adv = adv / (r.std(dim=1, correction=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std(correction=1) + eps)

    all_equal = equal_reward_groups(rewards, group_size)[:, None]  # [B, 1]
    adv = torch.where(all_equal, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def equal_reward_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups have rewards that are all exactly equal (they carry no learning signal: advantage 0).

    Args:
        rewards: ``[N]`` rewards, group-contiguous as in :func:`group_advantages`.
        group_size: ``G``.

    Returns:
        ``[B]`` bool.
    """
    r = _groups(rewards.detach(), group_size)  # [B, G]
    return (r == r[:, :1]).all(dim=1)


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's (Zheng et al., arXiv 2507.18071) length-normalised sequence log importance ratio, ``[n, 1]``.

    ``log s_i = (1 / |y_i|) * sum_t M_it * (logprobs_it - old_logprobs_it)``, so ``s_i`` is the geometric mean
    of the sequence's token ratios. The gradient flows through ``logprobs``: ``d s_i = s_i * (1 / |y_i|) *
    sum_t d logprobs_it``, GSPO's sequence-level gradient. A sequence without kept tokens gets 0 (ratio 1).

    Args:
        logprobs: ``[n, T]`` current log-probs.
        old_logprobs: ``[n, T]`` log-probs under the sampling policy.
        mask: ``[n, T]`` keep-mask.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    m = mask.to(logprobs.dtype)
    lengths = m.sum(dim=-1, keepdim=True).clamp(min=1)  # [n, 1]
    return ((logprobs - old_logprobs) * m).sum(dim=-1, keepdim=True) / lengths


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped surrogate loss with decoupled clip range and optional dual clip.

    ``ratio = exp(logprobs - old_logprobs)`` is formed in fp32 log space (a quotient of bf16 probabilities
    is biased upward and trips the upper clip spuriously).
    ``loss = max(-A * ratio, -A * clamp(ratio, 1 - eps_low, 1 + eps_high))``; with ``dual_clip = c`` the
    loss of tokens with ``A < 0`` is further capped at ``-A * c``.

    Args:
        logprobs: ``[N, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``[N, T]`` log-probs under the policy that sampled the rollout.
        advantages: ``[N, T]`` per-token advantages (a sequence's advantage broadcast to its tokens);
            anything broadcastable to ``[N, T]`` is accepted.
        eps_low: lower clip, ratio floor ``1 - eps_low`` (in ``[0, 1]``).
        eps_high: upper clip, ratio ceiling ``1 + eps_high`` (>= 0).
        dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-A * c``; ``None`` disables.

    Returns:
        ``(loss [N, T] float32, clipped_low [N, T] bool, clipped_high [N, T] bool)``, where
        ``clipped_high = (A > 0) & (ratio > 1 + eps_high)`` and ``clipped_low = (A < 0) &
        (ratio < 1 - eps_low)``: the tokens where the clamp is the active branch and the policy gradient
        is zero. Dual-clip activation is not included in these masks.

    Raises:
        ConfigError: ``eps_low`` outside ``[0, 1]``, ``eps_high < 0`` or ``dual_clip <= 1``.
    """
    if not 0.0 <= eps_low <= 1.0:
        raise ConfigError(f"eps_low={eps_low} must be in [0, 1] (the ratio floor is 1 - eps_low)")
    if not eps_high >= 0.0:
        raise ConfigError(f"eps_high={eps_high} must be >= 0")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ConfigError(f"dual_clip={dual_clip} must be > 1 (or None to disable it)")
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)

    adv = advantages.to(torch.float32)
    ratio = torch.exp(logprobs.to(torch.float32) - old_logprobs.to(torch.float32))  # [N, T]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)  # [N, T]
    if dual_clip is not None:
        # The cap is constant in the policy, so capped tokens get no gradient: a very large ratio on a bad
        # token cannot dominate the update.
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)

    clipped_high = (adv > 0) & (ratio > 1.0 + eps_high)  # [N, T]
    clipped_low = (adv < 0) & (ratio < 1.0 - eps_low)  # [N, T]
    return loss, clipped_low, clipped_high


def truncated_importance_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """Truncated importance-sampling weights ``min(exp(old - sampler), cap)`` of the sampled tokens ``[n, T]``.

    Corrects for a sampler that is not exactly the policy the ratio's old log-probs come from (a vLLM engine,
    other kernels or precision): the tokens were drawn from ``pi_sampler``, the objective is defined under
    ``pi_old``, so each token's loss is weighted by ``pi_old / pi_sampler``, truncated at ``cap`` to bound the
    variance (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
    ``vllm_importance_sampling_cap``, verl's ``tis_imp_ratio_cap``). 1 where ``mask`` is False.
    """
    _check_same_shape(old_logprobs=old_logprobs, sampler_logprobs=sampler_logprobs, mask=mask)
    if not cap > 0:
        raise ConfigError(f"cap must be > 0, got {cap}")
    weights = torch.exp(old_logprobs.detach() - sampler_logprobs.detach()).clamp(max=cap)
    return torch.where(mask.bool(), weights, torch.ones_like(weights))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of ``KL(policy || reference)`` from sampled-token log-probs.

    - ``k1 = lp - ref`` (unbiased, high variance, can be negative);
    - ``k2 = 0.5 * (lp - ref)^2``;
    - ``k3 = exp(ref - lp) - (ref - lp) - 1`` (unbiased, always >= 0; the default of peers).

    For ``k3`` the log-ratio ``ref - lp`` is clamped to ``[-20, 20]`` before use, so one token far from the
    reference cannot overflow ``exp``; the clamped value is used in both terms, which keeps ``k3 >= 0``
    exactly (it is then ``f(d) = e^d - d - 1`` of a finite ``d``). The price: tokens beyond the bound get no
    KL gradient. ``expm1`` avoids the cancellation of ``exp(d) - 1`` for small ``d``.

    Args:
        logprobs: ``[N, T]`` current policy log-probs.
        ref_logprobs: ``[N, T]`` reference log-probs.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[N, T]`` float32 per-token penalty (nats); mask and aggregate it like the policy loss.

    Raises:
        ConfigError: unknown ``estimator``.
    """
    _check_choice("estimator", estimator, KLEstimator)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = ref_logprobs.to(torch.float32) - logprobs.to(torch.float32)  # [N, T], ref - lp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    d = log_ratio.clamp(-_K3_LOG_RATIO_BOUND, _K3_LOG_RATIO_BOUND)
    return torch.expm1(d) - d


def _normaliser(value: float | Tensor | None, default: Tensor | float, name: str, like: Tensor) -> Tensor:
    """The normaliser as a float32 scalar on ``like``'s device, rejecting negative Python numbers."""
    if value is None:
        value = default
    if not isinstance(value, Tensor) and value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")
    return torch.as_tensor(value, dtype=torch.float32, device=like.device)


def aggregate_loss(
    token_loss: Tensor,
    mask: Tensor,
    mode: LossAggregation = "token-mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to the scalar an optimizer step uses.

    The normalisers describe the *whole* optimizer mini-batch, which may be split into micro-batches and
    across data-parallel ranks: pass the global counts and the per-call results sum exactly to the loss of
    the whole mini-batch (gradient accumulation then needs no rescaling). Left as ``None`` they default to
    this call's own counts.

    - ``token-mean``: ``sum(L*M) / num_tokens`` (DAPO); default ``num_tokens = M.sum()``.
    - ``seq-mean-token-mean``: ``sum_i [sum_t L*M / max(len_i, 1)] / num_sequences`` (GRPO paper);
      default ``num_sequences = N``.
    - ``seq-mean-token-sum``: ``sum_i sum_t L*M / num_sequences``.
    - ``seq-mean-token-sum-norm``: ``sum(L*M) / (num_sequences * max_length)`` (Dr. GRPO); default
      ``max_length = T``.

    A normaliser of 0 means an empty mini-batch: the result is then a 0 that is still connected to the
    graph (so ``backward`` works and gives zero gradients). Tensor normalisers are handled without a host
    sync.

    Args:
        token_loss: ``[N, T]`` per-token loss.
        mask: ``[N, T]`` keep-mask (bool or 0/1 float).
        mode: aggregation, see above.
        num_tokens: kept tokens in the whole mini-batch (``token-mean`` only).
        num_sequences: sequences in the whole mini-batch (``seq-mean-*`` modes).
        max_length: completion length budget for ``seq-mean-token-sum-norm``.

    Returns:
        Scalar float32 loss.

    Raises:
        ConfigError: unknown ``mode`` or a negative normaliser.
        ValueError: ``token_loss`` and ``mask`` are not both ``[N, T]``.
    """
    _check_choice("mode", mode, LossAggregation)
    _check_same_shape(token_loss=token_loss, mask=mask)
    if token_loss.dim() != 2:
        raise ValueError(f"token_loss must be [N, T], got shape {tuple(token_loss.shape)}")
    n, t = token_loss.shape
    loss = token_loss.to(torch.float32)
    weights = mask.to(torch.float32)  # [N, T]

    if mode == "token-mean":
        total = masked_sum(loss, mask)
        denom = _normaliser(num_tokens, weights.sum(), "num_tokens", loss)
    elif mode == "seq-mean-token-mean":
        lengths = weights.sum(dim=1).clamp_min(1.0)  # [N]
        total = (masked_sum(loss, mask, dim=1) / lengths).sum()
        denom = _normaliser(num_sequences, n, "num_sequences", loss)
    elif mode == "seq-mean-token-sum":
        total = masked_sum(loss, mask)
        denom = _normaliser(num_sequences, n, "num_sequences", loss)
    else:  # seq-mean-token-sum-norm
        if max_length is None:
            max_length = t
        if max_length < 1:
            raise ConfigError(f"max_length={max_length} must be >= 1")
        total = masked_sum(loss, mask)
        denom = _normaliser(num_sequences, n, "num_sequences", loss) * max_length

    # Select on the normaliser instead of branching on it: no host sync for tensor normalisers, and the
    # empty case stays a graph-connected 0 (total * 0) rather than a constant.
    positive = denom > 0
    safe_denom = torch.where(positive, denom, torch.ones_like(denom))
    return torch.where(positive, total / safe_denom, total * 0.0)
