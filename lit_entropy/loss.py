"""The policy objective of one micro-batch: clipped surrogate + regularizer adjustments + optional KL.

The maths lives in `lit_entropy.functional`; this file only composes it with the regularizer contract.
Shapes: ``n`` sequences in the micro-batch, ``T`` completion length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from lit_entropy.errors import ConfigError, check_choice
from lit_entropy.functional import (
    AdvantageMode,
    AdvantageScale,
    KLEstimator,
    LossAggregation,
    aggregate_loss,
    clipped_surrogate,
    kl_penalty,
    sequence_log_ratio,
)
from lit_entropy.regularizer import MinibatchView, Regularizer, combine, total_loss_terms

#: How importance ratios are formed: per token (PPO, GRPO) or per sequence (GSPO).
ImportanceLevel = Literal["token", "sequence"]


@dataclass
class Loss:
    """The GRPO/PPO objective's options (names as in verl and TRL).

    Args:
        advantage: ``grpo`` (group-normalised), ``dr_grpo`` (no std scaling), ``rloo`` (leave-one-out baseline).
        advantage_scale: divide advantages by the ``group`` std, the ``batch`` std, or ``none``.
        eps_low: lower clip range, ratio clamped at ``1 - eps_low``.
        eps_high: upper clip range, ratio clamped at ``1 + eps_high`` (DAPO clip-higher: 0.28).
        dual_clip: cap the loss of negative-advantage tokens at ``-A * dual_clip`` (> 1), or None.
        kl_coef: weight of the per-token KL to the reference (adapters off); 0 skips the reference pass.
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        aggregation: how per-token losses become one number; ``token-mean`` is the exact token mean of the
            optimizer mini-batch even when it is split into micro-batches.
        importance_sampling_level: ``token`` (PPO/GRPO: one ratio per token) or ``sequence`` (GSPO, Zheng et
            al. 2025: every token of a sequence gets the sequence's length-normalised ratio ``s_i``, clipped as a
            whole; use it with ``seq-mean-token-mean`` and the paper's small clip ranges, e.g. ``eps_low: 3e-4,
            eps_high: 4e-4``, since ``s_i`` stays much closer to 1 than token ratios do).
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` without EOS out of the loss
            (as TRL's option of this name; DAPO's overlong filtering). They still count in their group's
            reward statistics and advantages.
        sampler_correction_cap: truncated importance sampling for a sampler that is not exactly the trained policy
            (``sampling.engine: vllm``): each token's surrogate is weighted by ``min(exp(old - sampler), cap)``,
            ``old`` the trainer's log-prob of the rollout policy, ``sampler`` the engine's (TRL's
            ``vllm_importance_sampling_cap``, verl's ``tis_imp_ratio_cap``; 2 to 3 there). None: off, the default,
            since with an exact sampler the weights are 1.
    """

    advantage: AdvantageMode = "grpo"
    advantage_scale: AdvantageScale = "group"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    aggregation: LossAggregation = "token-mean"
    importance_sampling_level: ImportanceLevel = "token"
    mask_truncated_completions: bool = False
    sampler_correction_cap: float | None = None

    def validate(self) -> None:
        """Check every option; the CLI checks the ``Literal`` choices while parsing, this also covers a `Loss`
        built in Python.

        Raises:
            ConfigError: Naming the field, the allowed values and the value given.
        """
        for name, choices in (
            ("advantage", AdvantageMode),
            ("advantage_scale", AdvantageScale),
            ("kl_estimator", KLEstimator),
            ("aggregation", LossAggregation),
            ("importance_sampling_level", ImportanceLevel),
        ):
            check_choice(f"loss.{name}", getattr(self, name), choices)
        if self.eps_low < 0 or self.eps_high < 0:
            raise ConfigError(
                f"loss.eps_low and loss.eps_high must be >= 0, got {self.eps_low}, {self.eps_high}"
            )
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"loss.dual_clip must be > 1 (or null), got {self.dual_clip}")
        if self.kl_coef < 0:
            raise ConfigError(f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        if self.sampler_correction_cap is not None and not (
            isinstance(self.sampler_correction_cap, (int, float))
            and not isinstance(self.sampler_correction_cap, bool)
            and self.sampler_correction_cap >= 1
        ):
            raise ConfigError(
                f"loss.sampler_correction_cap must be a number >= 1 or null, got {self.sampler_correction_cap!r}"
            )
        if not isinstance(self.mask_truncated_completions, bool):
            raise ConfigError(
                f"loss.mask_truncated_completions must be true or false, got {self.mask_truncated_completions!r}"
            )


@dataclass
class MicrobatchLoss:
    """The loss of one micro-batch and what it is made of (all detached except ``loss``)."""

    loss: Tensor  # scalar, with gradient
    kl: Tensor | None  # [n, T] per-token KL, or None
    clipped_low: Tensor  # [n, T] bool
    clipped_high: Tensor  # [n, T] bool
    loss_terms: dict[str, Tensor]
    metrics: dict[str, Tensor | float]


def microbatch_loss(
    loss: Loss, view: MinibatchView, regularizers: Sequence[Regularizer], max_length: int
) -> MicrobatchLoss:
    """Loss of one micro-batch, normalised by the whole mini-batch (summing over micro-batches gives its loss).

    Per token: ``w * c * surrogate(A', eps_low', eps_high') + penalties + kl_coef * KL`` (the surrogate's ratio is
    the token's, or its sequence's with ``importance_sampling_level="sequence"``), where ``A'`` and the clip
    range may be overridden by one regularizer each, ``c`` the truncated importance weight of a sampler correction
    (1 without one), ``w`` is the product of the regularizers' weights and
    ``penalties`` their sum; then aggregated by ``loss.aggregation``, plus the regularizers' scalar terms.
    """
    combined = combine(regularizers, view)
    ratio_logprobs = view.logprobs
    if loss.importance_sampling_level == "sequence":  # GSPO: each token carries its sequence's ratio s_i
        ratio_logprobs = view.old_logprobs + sequence_log_ratio(view.logprobs, view.old_logprobs, view.mask)
    surrogate, clipped_low, clipped_high = clipped_surrogate(
        ratio_logprobs,
        view.old_logprobs,
        combined.advantages,
        eps_low=combined.eps_low,
        eps_high=combined.eps_high,
        dual_clip=loss.dual_clip,
    )  # [n, T]
    if view.sampler_weights is not None:  # truncated importance sampling (loss.sampler_correction_cap)
        surrogate = surrogate * view.sampler_weights
    token_loss = surrogate if combined.token_weights is None else surrogate * combined.token_weights
    if combined.token_penalties is not None:
        token_loss = token_loss + combined.token_penalties
    kl = None
    if loss.kl_coef > 0 and view.ref_logprobs is not None:
        kl = kl_penalty(view.logprobs, view.ref_logprobs, loss.kl_estimator)  # [n, T]
        token_loss = token_loss + loss.kl_coef * kl
    aggregated = aggregate_loss(
        token_loss,
        view.mask,
        loss.aggregation,
        num_tokens=view.num_tokens,
        num_sequences=view.num_sequences,
        max_length=max_length,
    )
    terms = total_loss_terms(combined.loss_terms, aggregated)
    return MicrobatchLoss(
        loss=aggregated + terms,
        kl=None if kl is None else kl.detach(),
        clipped_low=clipped_low,
        clipped_high=clipped_high,
        loss_terms={key: value.detach() for key, value in combined.loss_terms.items()},
        metrics=combined.metrics,
    )
