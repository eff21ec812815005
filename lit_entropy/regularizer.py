"""The extension point for entropy-control callbacks: the `Regularizer` contract the RL module calls.

A Lightning callback cannot change the loss by itself, so the module asks every `Regularizer` in the Trainer's
callbacks, for every micro-batch of every optimizer mini-batch, two things:

1. ``replace_inputs(view)``: replacements for the objective's *inputs* (per-token advantages: REPO; clip range:
   ADAPO). Each input can be owned by at most one regularizer; two owners are an error naming both.
2. ``adjust(view)``: *adjustments* that compose: per-token weights on the policy-gradient term (multiply:
   Clip-Cov, high-entropy tokens), per-token penalties (add: KL-Cov), scalar loss terms (add: entropy bonus,
   Lagrangian constraint) and metrics.

Both are pure functions of the view and the callback's current state; state changes only in Lightning hooks
(normally ``on_train_batch_end``, once per RL iteration) and travels in ``state_dict`` so resume is exact.
Because weights multiply and penalties/terms add, the order of callbacks never matters.

Shapes: ``n`` sequences in the micro-batch, ``m`` in the optimizer mini-batch, ``T`` completion length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor

from lit_entropy.errors import ConfigError

REPLACEABLE = ("advantages", "eps_low", "eps_high")


@dataclass(frozen=True)
class MinibatchView:
    """What a regularizer sees of one micro-batch (and of the optimizer mini-batch it belongs to).

    Attributes:
        logprobs: ``[n, T]`` fp32 log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs: ``[n, T]`` log-probs under the policy that sampled the rollout (no gradient).
        ref_logprobs: ``[n, T]`` log-probs under the reference (adapters off), or None when ``kl_coef == 0``.
        entropy: ``[n, T]`` fp32 full-vocabulary entropy in nats; has a gradient when a regularizer sets
            ``needs_entropy_grad``.
        advantages: ``[n, T]`` per-token advantages (sequence advantage broadcast), before any replacement.
        mask: ``[n, T]`` bool keep-mask of real completion tokens.
        num_tokens: scalar, kept tokens in the whole optimizer mini-batch (the token-mean normaliser).
        num_sequences: sequences in the whole optimizer mini-batch.
        eps_low: lower clip range in force: the configured one in ``replace_inputs``, the replaced one (if a
            regularizer owns it) in ``adjust``.
        eps_high: upper clip range in force (same rule).
        iteration: RL iteration (0-based; one per training step).
        update: optimizer update within this iteration (0-based, over epochs and mini-batches).
        updates_per_iteration: ``ppo_epochs * minibatches``; 1 means fully on-policy.
        microbatch_rows: the rows of this micro-batch inside the mini-batch tensors below.
        minibatch_logprobs: ``[m, T]`` detached current log-probs of the whole mini-batch, or None unless a
            regularizer sets ``needs_minibatch_stats``.
        minibatch_entropy: ``[m, T]`` detached entropy of the whole mini-batch (same condition).
        minibatch_old_logprobs: ``[m, T]`` old log-probs of the whole mini-batch (same condition).
        minibatch_advantages: ``[m, T]`` advantages of the whole mini-batch.
        minibatch_mask: ``[m, T]`` keep-mask of the whole mini-batch.
        sampler_weights: ``[n, T]`` truncated importance weights of the sampler correction
            (``loss.sampler_correction_cap``), or None without one.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor | None
    entropy: Tensor
    advantages: Tensor
    mask: Tensor
    num_tokens: Tensor
    num_sequences: int
    eps_low: float
    eps_high: float
    iteration: int
    update: int
    updates_per_iteration: int
    microbatch_rows: slice
    minibatch_logprobs: Tensor | None = None
    minibatch_entropy: Tensor | None = None
    minibatch_old_logprobs: Tensor | None = None
    minibatch_advantages: Tensor | None = None
    minibatch_mask: Tensor | None = None
    sampler_weights: Tensor | None = None

    def token_mean(self, values: Tensor) -> Tensor:
        """``sum(values * mask) / num_tokens``: summed over the micro-batches, the exact mini-batch token mean."""
        return (values * self.mask).sum() / self.num_tokens.clamp(min=1)


@dataclass
class Replacements:
    """Replacements for the objective's inputs; None leaves an input as it is."""

    advantages: Tensor | None = None  # [n, T]
    eps_low: float | None = None
    eps_high: float | None = None

    def owned(self) -> list[str]:
        return [name for name in REPLACEABLE if getattr(self, name) is not None]


@dataclass
class Adjustment:
    """Composable changes to the loss of one micro-batch.

    Attributes:
        token_weights: ``[n, T]`` multiplies the per-token policy-gradient loss (0 removes a token's gradient but
            keeps it in the normaliser).
        token_penalties: ``[n, T]`` added to the per-token loss before aggregation.
        loss_terms: scalar terms added to the micro-batch loss; express them with ``view.token_mean`` so that
            summing over micro-batches gives the mini-batch value.
        metrics: scalars logged as ``reg/<name>/<key>``, averaged over the iteration's micro-batches.
    """

    token_weights: Tensor | None = None
    token_penalties: Tensor | None = None
    loss_terms: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Regularizer(Callback):
    """Base class of entropy-control callbacks. Subclasses implement ``replace_inputs`` and/or ``adjust``.

    Class attributes:
        replaces: the objective inputs this regularizer may replace (subset of ``advantages``, ``eps_low``,
            ``eps_high``); declared so that conflicts are found before training starts.
        needs_entropy_grad: the module must keep the graph through the entropy (costs memory).

    Properties:
        needs_minibatch_stats: the module must provide the detached log-probs and entropy of the whole
            mini-batch (an extra no-grad forward when the mini-batch is split into micro-batches). False by
            default; a subclass overrides the property when it needs them (e.g. only for ``scope="batch"``).
    """

    replaces: ClassVar[tuple[str, ...]] = ()
    needs_entropy_grad: ClassVar[bool] = False

    @property
    def needs_minibatch_stats(self) -> bool:
        return False

    @property
    def name(self) -> str:
        """Metric namespace: ``reg/<name>/``."""
        return type(self).__name__

    def log_state(self, pl_module: LightningModule, values: Mapping[str, float]) -> None:
        """Log ``reg/<name>/<key>`` for each of ``values`` at this RL iteration (call from a Lightning hook)."""
        for key, value in values.items():
            pl_module.log(f"reg/{self.name}/{key}", float(value), on_step=True, on_epoch=False, batch_size=1)

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    def replace_inputs(self, view: MinibatchView) -> Replacements | None:
        return None

    def adjust(self, view: MinibatchView) -> Adjustment | None:
        return None


class IterationOutputs(TypedDict):
    """What `lit_entropy.GRPO.training_step` returns for one RL iteration: the input of every callback's
    ``on_train_batch_end``. Scalars are 0-dim float32 tensors, the same on every rank.

    Attributes:
        entropy: the rollout's mean token entropy over its kept tokens, nats (NaN without a kept token).
        reward: the rollout's mean reward.
        updates: optimizer updates made for this rollout (``ppo_epochs * N / minibatch_size``; 1 means fully
            on-policy, every importance ratio exactly 1).
        token_entropy: ``[N, T]`` token entropy of the first epoch (the policy that sampled the rollout).
        token_logprobs: ``[N, T]`` log-probs of the sampled tokens, first epoch.
        token_advantages: ``[N, T]`` per-token advantages (before any regularizer's replacement).
        token_mask: ``[N, T]`` keep-mask of the completion tokens.
        metrics: every statistic the iteration logged, by metric name (``rollout/...``, ``train/...``,
            ``reg/<name>/...``), each a 0-dim tensor.
        prompts: the ``N`` prompts as the dataset holds them (text or chat messages), one per completion
            (each prompt repeated ``G`` times).
        completions: the ``N`` decoded completions.
        rewards: ``[N]`` total reward of each completion.
        rewards_per_function: reward function name -> ``[N]`` its unweighted values.
        advantages: ``[N]`` each completion's advantage (before any regularizer's replacement).
    """

    entropy: Tensor
    reward: Tensor
    updates: Tensor
    token_entropy: Tensor
    token_logprobs: Tensor
    token_advantages: Tensor
    token_mask: Tensor
    metrics: dict[str, Tensor]
    prompts: list[Any]
    completions: list[str]
    rewards: Tensor
    rewards_per_function: dict[str, Tensor]
    advantages: Tensor


#: The scalar fields of `IterationOutputs` (besides ``metrics``).
SCALAR_OUTPUTS = ("entropy", "reward", "updates")


def scalar_outputs(outputs: Mapping[str, Any]) -> dict[str, float]:
    """The scalar fields of an `IterationOutputs` and every one of its ``metrics``, as floats, in one dict."""
    values = {key: float(outputs[key]) for key in SCALAR_OUTPUTS if key in outputs}
    values.update({key: float(value) for key, value in outputs.get("metrics", {}).items()})
    return values


def measured_entropy(outputs: Any, name: str) -> float | None:
    """``outputs["entropy"]`` of ``training_step`` (rollout mean token entropy, nats) as a float.

    ``None`` when it is not finite (a rollout without a single kept token has no mean entropy): controllers
    then leave their state as it is for that iteration.

    Raises:
        ConfigError: naming ``name`` when the outputs carry no entropy (a module other than GRPO).
    """
    if not isinstance(outputs, Mapping) or "entropy" not in outputs:
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ConfigError(f"{name} needs outputs['entropy'] from training_step, got {keys}")
    value = float(outputs["entropy"])
    return value if math.isfinite(value) else None


def find_regularizers(callbacks: Iterable[Callback]) -> list[Regularizer]:
    """The regularizers among the Trainer's callbacks, after checking that no two own the same input."""
    regularizers = [callback for callback in callbacks if isinstance(callback, Regularizer)]
    owners: dict[str, str] = {}
    for regularizer in regularizers:
        for name in regularizer.replaces:
            if name not in REPLACEABLE:
                raise ConfigError(
                    f"{regularizer.name} declares an unknown input to replace {name!r}; known: {REPLACEABLE}"
                )
            if name in owners:
                raise ConfigError(
                    f"regularizers {owners[name]} and {regularizer.name} both replace {name!r}; keep only one"
                )
            owners[name] = regularizer.name
    return regularizers


@dataclass
class Combined:
    """The result of asking every regularizer about one micro-batch."""

    advantages: Tensor
    eps_low: float
    eps_high: float
    token_weights: Tensor | None
    token_penalties: Tensor | None
    loss_terms: dict[str, Tensor]
    metrics: dict[str, Tensor | float]


def combine(regularizers: Sequence[Regularizer], view: MinibatchView) -> Combined:
    """Apply every regularizer's replacements, then collect and compose their adjustments.

    Replacements are applied first. Every regularizer's ``adjust`` then receives the same view (order independence),
    with the clip range in force after the replacements; advantages stay the group advantages (a covariance or an
    entropy quantile is defined on them, not on another regularizer's reshaping).
    """
    advantages, eps_low, eps_high = view.advantages, view.eps_low, view.eps_high
    for regularizer in regularizers:
        replaced = regularizer.replace_inputs(view)
        if replaced is None:
            continue
        undeclared = set(replaced.owned()) - set(regularizer.replaces)
        if undeclared:
            raise ConfigError(
                f"{regularizer.name} replaced {sorted(undeclared)} without declaring it in `replaces`"
            )
        if replaced.advantages is not None:
            advantages = replaced.advantages
        if replaced.eps_low is not None:
            eps_low = replaced.eps_low
        if replaced.eps_high is not None:
            eps_high = replaced.eps_high
    weights: Tensor | None = None
    penalties: Tensor | None = None
    terms: dict[str, Tensor] = {}
    metrics: dict[str, Tensor | float] = {}
    if (eps_low, eps_high) != (view.eps_low, view.eps_high):
        # adjustments judge "clip active" against the range the surrogate will actually use
        view = dataclasses.replace(view, eps_low=eps_low, eps_high=eps_high)
    for regularizer in regularizers:
        adjustment = regularizer.adjust(view)
        if adjustment is None:
            continue
        if adjustment.token_weights is not None:
            weights = adjustment.token_weights if weights is None else weights * adjustment.token_weights
        if adjustment.token_penalties is not None:
            penalties = (
                adjustment.token_penalties if penalties is None else penalties + adjustment.token_penalties
            )
        for key, value in adjustment.loss_terms.items():
            terms[f"{regularizer.name}/{key}"] = value
        for key, value in adjustment.metrics.items():
            metrics[f"reg/{regularizer.name}/{key}"] = value
    return Combined(advantages, eps_low, eps_high, weights, penalties, terms, metrics)


def total_loss_terms(terms: dict[str, Tensor], like: Tensor) -> Tensor:
    """Sum of scalar loss terms (a zero connected to ``like``'s device and dtype when there are none)."""
    total = torch.zeros((), device=like.device, dtype=like.dtype)
    for value in terms.values():
        total = total + value
    return total
