"""Token-wise covariance and token selection shared by `ClipCov`, `KLCov` and `HighEntropyTokens`.

Cui et al. (arXiv 2505.22617): for a softmax policy one update changes the entropy by about
``-eta * Cov(log pi(a), A)``, so tokens that are both likely *and* advantaged drive entropy collapse. Over a
set of ``n`` kept tokens, token ``i`` contributes the centred product

    cov_i = (lp_i - mean(lp)) * (A_i - mean(A))        (no division by n; lp detached)

with both means over the kept tokens of the *scope*: the whole optimizer mini-batch (``scope="batch"``, the
paper's definition) or one micro-batch (``scope="microbatch"``, what verl does per micro-batch and per GPU,
kept for parity; verl issue 7829).

Every selection function here takes the **full set of tokens of its scope** (``[m, T]`` tensors) and
returns a keep-mask of the same shape, so that every micro-batch of a mini-batch computes the identical
selection and then takes its own rows. Across data-parallel ranks the full set is the concatenation of the
ranks' mini-batches: `token_scope` all-gathers the ``[m, T]`` inputs of ``scope="batch"`` (rank order,
right-padded to the longest ``T``), so every rank selects from the global mini-batch exactly what one process
holding it would select, and keeps its own rows (`TokenScope.local`).

Shapes: ``m`` sequences in the scope, ``n`` in the micro-batch, ``T`` completion length. Log-probs and
entropies are in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from typing_extensions import override

from lit_entropy.distributed import gather_rows
from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import MinibatchView, Regularizer

Scope = Literal["batch", "microbatch"]
SCOPES: tuple[str, ...] = ("batch", "microbatch")

__all__ = [
    "SCOPES",
    "ScopedRegularizer",
    "Scope",
    "TokenScope",
    "check_fraction",
    "check_scope",
    "clip_cov_candidates",
    "ppo_clip_active",
    "select_at_random",
    "select_top",
    "selection_count",
    "token_covariance",
    "token_scope",
]


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Centred products ``(lp_i - mean(lp)) * (A_i - mean(A))`` over the kept tokens.

    Args:
        logprobs: ``[m, T]`` log-probs of the sampled tokens; detached here (the covariance only ranks
            tokens).
        advantages: ``[m, T]`` per-token advantages.
        mask: ``[m, T]`` keep-mask; the means run over its kept tokens only.

    Returns:
        ``[m, T]`` float32 covariance contributions, exactly 0 at padded positions (whatever ``logprobs``
        holds there, NaN included). All zeros when no token is kept.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    # where (not a product) so that -inf / NaN log-probs of padding cannot leak into the means
    lp = torch.where(keep, logprobs.detach().float(), zero)  # [m, T]
    adv = torch.where(keep, advantages.detach().float(), zero)  # [m, T]
    count = keep.sum().clamp(min=1)
    centred = (lp - lp.sum() / count) * (adv - adv.sum() / count)  # [m, T]
    return torch.where(keep, centred, zero)


def ppo_clip_active(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """Tokens whose PPO clip is the active branch (their policy gradient is already zero).

    ``(A > 0 & ratio > 1 + eps_high) | (A < 0 & ratio < 1 - eps_low)`` with ``ratio = exp(lp - old)``
    formed from fp32 log-probs, the same definition as ``functional.clipped_surrogate``.

    Args:
        logprobs: ``[m, T]`` current log-probs (detached here).
        old_logprobs: ``[m, T]`` log-probs under the rollout policy.
        advantages: ``[m, T]`` per-token advantages.
        eps_low: lower clip range (ratio floor ``1 - eps_low``).
        eps_high: upper clip range (ratio ceiling ``1 + eps_high``).

    Returns:
        ``[m, T]`` bool, not masked (combine with the keep-mask).
    """
    ratio = torch.exp(logprobs.detach().float() - old_logprobs.detach().float())  # [m, T]
    return ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))


def clip_cov_candidates(
    cov: Tensor, mask: Tensor, clip_active: Tensor, cov_lb: float, cov_ub: float
) -> Tensor:
    """Clip-Cov candidates: kept tokens with ``cov_lb < cov < cov_ub`` (strict) whose PPO clip is inactive.

    Args:
        cov: ``[m, T]`` covariance contributions (`token_covariance`).
        mask: ``[m, T]`` keep-mask.
        clip_active: ``[m, T]`` bool, tokens already clipped by PPO (`ppo_clip_active`).
        cov_lb: exclusive lower bound.
        cov_ub: exclusive upper bound.

    Returns:
        ``[m, T]`` bool.
    """
    return mask.bool() & (cov > cov_lb) & (cov < cov_ub) & ~clip_active


def selection_count(fraction: float, num_tokens: int) -> int:
    """``max(floor(fraction * n), 1)`` tokens, or 0 when ``n == 0``.

    The product is rounded to 9 decimals before ``floor`` so that binary representation error cannot drop a
    token (``2e-4 * 5000`` must give 1, not 0 from ``0.99999...``).
    """
    if num_tokens <= 0:
        return 0
    return max(math.floor(round(fraction * num_tokens, 9)), 1)


def select_at_random(candidates: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` of the candidates uniformly at random without replacement (all of them if fewer).

    The permutation is drawn on the generator's device (CPU) over the candidates in row-major order, so any
    process holding the same full ``candidates`` and an identically seeded generator selects the same tokens.

    Args:
        candidates: ``[m, T]`` bool.
        count: how many to select (>= 0).
        generator: a CPU ``torch.Generator``; advanced by this call.

    Returns:
        ``[m, T]`` bool, ``min(count, candidates.sum())`` entries set.
    """
    flat = candidates.reshape(-1)
    indices = flat.nonzero().squeeze(1)  # [c], row-major order
    selected = torch.zeros_like(flat)
    if count >= len(indices):
        selected[indices] = True
    elif count > 0:
        order = torch.randperm(len(indices), generator=generator)[:count]
        selected[indices[order.to(indices.device)]] = True
    return selected.reshape(candidates.shape)


def select_top(scores: Tensor, mask: Tensor, count: int) -> Tensor:
    """The ``count`` kept tokens with the largest ``scores``; ties go to the earlier token in row-major order.

    A stable sort (rather than ``topk``, whose tie order is unspecified) makes the choice reproducible on
    every device and every micro-batch.

    Args:
        scores: ``[m, T]`` float.
        mask: ``[m, T]`` keep-mask; padded tokens are never selected.
        count: how many to select; capped at the number of kept tokens.

    Returns:
        ``[m, T]`` bool.
    """
    keep = mask.bool().reshape(-1)
    indices = keep.nonzero().squeeze(1)  # [k] kept positions, row-major
    selected = torch.zeros_like(keep)
    if count > 0 and len(indices) > 0:
        order = torch.sort(scores.reshape(-1)[indices], descending=True, stable=True).indices[:count]
        selected[indices[order]] = True
    return selected.reshape(mask.shape)


@dataclass(frozen=True)
class TokenScope:
    """The detached tokens a selection is made over, and where the current micro-batch sits in them.

    Attributes:
        logprobs: ``[m, T]`` detached current log-probs.
        old_logprobs: ``[m, T]`` rollout-policy log-probs.
        advantages: ``[m, T]`` per-token advantages (before any replacement).
        entropy: ``[m, T]`` detached entropy in nats.
        mask: ``[m, T]`` bool keep-mask.
        rows: the current micro-batch's rows inside the ``[m, T]`` tensors.
        width: the micro-batch's own ``T`` (the gathered tensors of several ranks may be wider).
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    entropy: Tensor
    mask: Tensor
    rows: slice
    width: int

    def local(self, values: Tensor) -> Tensor:
        """The current micro-batch's ``[n, T]`` part of ``[m, T']`` scope-wide ``values``."""
        return values[self.rows, : self.width]


def token_scope(view: MinibatchView, scope: Scope, owner: str) -> TokenScope:
    """The tokens of ``scope``: the view's mini-batch tensors (``batch``) or its micro-batch's own.

    Under data parallelism, ``batch`` scope all-gathers the five ``[m, T]`` tensors over the ranks (rank
    order) and shifts ``rows`` by this rank's offset: the selection functions see the global mini-batch.

    Args:
        view: the micro-batch view given to ``adjust``.
        scope: ``batch`` or ``microbatch``.
        owner: the regularizer's name, for the error message.

    Raises:
        ValueError: ``batch`` scope but the view carries no mini-batch statistics (the regularizer must set
            ``needs_minibatch_stats``).
    """
    if scope == "microbatch":
        return TokenScope(
            logprobs=view.logprobs.detach(),
            old_logprobs=view.old_logprobs.detach(),
            advantages=view.advantages.detach(),
            entropy=view.entropy.detach(),
            mask=view.mask.bool(),
            rows=slice(0, view.logprobs.shape[0]),
            width=view.logprobs.shape[1],
        )
    fields = {
        "minibatch_logprobs": view.minibatch_logprobs,
        "minibatch_old_logprobs": view.minibatch_old_logprobs,
        "minibatch_advantages": view.minibatch_advantages,
        "minibatch_entropy": view.minibatch_entropy,
        "minibatch_mask": view.minibatch_mask,
    }
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise ValueError(
            f"{owner}(scope='batch') needs the view's {missing}: the module fills them only when a "
            "regularizer's needs_minibatch_stats property is True"
        )
    (logprobs, old_logprobs, advantages, entropy, mask), offset = gather_rows(
        [
            view.minibatch_logprobs.detach(),
            view.minibatch_old_logprobs.detach(),
            view.minibatch_advantages.detach(),
            view.minibatch_entropy.detach(),
            view.minibatch_mask.bool(),
        ]
    )
    rows = view.microbatch_rows
    return TokenScope(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        entropy=entropy,
        mask=mask,
        rows=slice(rows.start + offset, rows.stop + offset),
        width=view.logprobs.shape[1],
    )


def check_scope(owner: str, scope: str) -> None:
    """ConfigError naming ``<owner>.scope`` unless it is ``batch`` or ``microbatch``."""
    if scope not in SCOPES:
        raise ConfigError(f"{owner}.scope must be one of {list(SCOPES)}, got {scope!r}")


def check_fraction(owner: str, name: str, value: float) -> None:
    """ConfigError naming ``<owner>.<name>`` unless ``0 < value <= 1``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"{owner}.{name} must be a fraction in (0, 1], got {value!r}")


class ScopedRegularizer(Regularizer):
    """A regularizer whose token selection runs over a `Scope`: the whole mini-batch or each micro-batch.

    Subclasses set ``self.scope``; ``batch`` scope asks the module for the mini-batch statistics
    (``needs_minibatch_stats``), ``microbatch`` scope spares it that extra no-grad forward.
    """

    scope: Scope = "batch"

    @property
    @override
    def needs_minibatch_stats(self) -> bool:
        return self.scope == "batch"

    def scoped_tokens(self, view: MinibatchView) -> TokenScope:
        """`token_scope` of ``view`` over this regularizer's scope."""
        return token_scope(view, self.scope, self.name)
