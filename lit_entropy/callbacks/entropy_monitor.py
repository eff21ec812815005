"""`EntropyMonitor`: per-iteration statistics of the token entropy and of the covariance that drives it.

Nothing here changes the loss: the monitor is a plain Lightning `Callback` (like `CollapseGuard` and
`EntropyLaw`), not a `Regularizer`, so the module never asks it for overrides or adjustments and a run that only
monitors is labelled plain GRPO. Once per RL iteration (``on_train_batch_end``) it reads the
detached ``[N, T]`` tensors that ``training_step`` returns (``token_entropy``, ``token_logprobs`` of the
first epoch, ``token_advantages``, ``token_mask``) and logs, under ``monitor/``:

- ``entropy_mean``, ``entropy_median``, ``entropy_p10``, ``entropy_p90``: the token-entropy distribution over
  the kept tokens (nats); quantiles linearly interpolated, as ``numpy.percentile``;
- ``entropy_frac_below``: fraction of kept tokens with entropy ``< low_entropy`` nats;
- ``entropy_bucket_<b>``: mean entropy of the kept tokens in completion-position bucket ``b`` (equal-width
  buckets of positions ``0..T-1``; see `position_buckets`);
- ``cov_mean`` and ``cov_top_mean``: mean over kept tokens of ``cov_i = (lp_i - mean lp)(A_i - mean A)``
  (the covariance ``Cov(lp, A)``) and the mean of its ``max(1, floor(top_fraction * n))`` largest values;
- ``predicted_dH``: ``-cov_mean``, the first-order entropy change that this iteration's update should cause
  (Cui et al., arXiv 2505.22617: ``dH ~= -eta * Cov(lp, A)`` with ``eta = 1``). The
  real step size depends on the learning rate, the optimizer and the number of updates, so this is a
  *proportional* predictor: compare its sign and correlation, not its magnitude;
- ``observed_dH``: ``H_t - H_{t-1}``, logged at iteration ``t`` (the change the previous prediction was for);
- ``dH_correlation``: Pearson correlation of the (predicted, observed) pairs so far, once there are >= 3.

Cross-rank: every statistic reduces through torchmetrics states (sums all-reduced, samples all-gathered), so
under data parallelism each rank logs the statistics of the global rollout. Means, the low-entropy fraction,
the bucket means and ``cov_mean`` are exact (``cov_mean`` is centred on the *global* means: a first
reduction gives them, a second sums the centred products). ``cov_top_mean`` is exact too: every rank sends its
``k`` largest globally-centred covariances and the global top ``k`` is among them. Quantiles are exact while a
rank has at most ``max_tokens`` kept tokens; beyond that each rank contributes an evenly spaced subsample.
Position buckets are relative to each rank's padded length ``T``.

Shapes: ``N`` sequences in the rollout, ``T`` completion length. Entropies and log-probs in nats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import typing_extensions
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import CatMetric

from lit_entropy.callbacks.covariance import check_fraction, selection_count
from lit_entropy.errors import ConfigError

__all__ = [
    "TOKEN_OUTPUTS",
    "EntropyMonitor",
    "TokenSums",
    "pearson_correlation",
    "position_buckets",
    "subsample_evenly",
    "token_outputs",
    "top_mean",
]

#: The keys of ``training_step``'s outputs the monitor reads, each ``[N, T]``.
TOKEN_OUTPUTS = ("token_entropy", "token_logprobs", "token_advantages", "token_mask")
QUANTILES = (0.1, 0.5, 0.9)


# --- pure maths ----------------------------------------------------------------------------------------


def position_buckets(length: int, buckets: int) -> Tensor:
    """The bucket of every completion position: ``floor(t * buckets / length)`` for ``t in 0..length-1``.

    Buckets have equal width ``length / buckets`` positions (bucket ``b`` holds ``b*length/buckets <= t <
    (b+1)*length/buckets``), so with ``length = 6, buckets = 4`` the positions go to ``0 0 1 2 2 3``. When
    ``length < buckets`` some buckets are empty.

    Args:
        length: ``T``, completion positions (>= 0).
        buckets: number of buckets (>= 1).

    Returns:
        ``[T]`` int64 bucket indices in ``[0, buckets)``.
    """
    return torch.arange(length) * buckets // max(length, 1)


def subsample_evenly(values: Tensor, max_count: int) -> Tensor:
    """At most ``max_count`` of ``values``, evenly spaced: indices ``floor(i * n / max_count)``.

    Deterministic (no RNG to carry or to keep in step across ranks) and spread over the whole rollout, so the
    subsample holds every sequence's tokens in proportion. All values when ``n <= max_count``.

    Args:
        values: ``[n]``.
        max_count: the most values to keep (>= 1).

    Returns:
        ``[min(n, max_count)]``, in the original order.
    """
    count = values.shape[0]
    if count <= max_count:
        return values
    indices = torch.arange(max_count, device=values.device) * count // max_count
    return values[indices]


def top_mean(values: Tensor, count: int) -> float:
    """Mean of the ``count`` largest ``values`` (of all of them if fewer); NaN when ``values`` is empty."""
    if values.numel() == 0:
        return math.nan
    return float(torch.topk(values.float(), min(count, values.numel())).values.mean())


def pearson_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's ``r`` of paired samples (float64), or None with fewer than 2 pairs or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson_correlation needs paired samples, got {len(xs)} and {len(ys)} values")
    count = len(xs)
    if count < 2:
        return None
    mean_x, mean_y = math.fsum(xs) / count, math.fsum(ys) / count
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    sxx = math.fsum((x - mean_x) ** 2 for x in xs)
    syy = math.fsum((y - mean_y) ** 2 for y in ys)
    if sxx == 0.0 or syy == 0.0:
        return None
    return sxy / math.sqrt(sxx * syy)


class TokenSums(Metric):
    """A vector of sums that is all-reduced with ``sum``: counts and totals in one collective."""

    full_state_update = False
    total: Tensor

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(size), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add ``values`` (``[size]``)."""
        self.total += values.to(self.total.dtype)

    def compute(self) -> Tensor:
        return self.total


# --- the callback --------------------------------------------------------------------------------------


class EntropyMonitor(Callback):
    """Logs the token-entropy distribution, covariance statistics, and predicted vs observed entropy change.

    See the module docstring for every metric. Reads ``outputs[k]`` for ``k`` in `TOKEN_OUTPUTS` (``[N, T]``
    detached tensors that `lit_entropy.GRPO` returns); never changes the loss. The cost is a few reductions
    over the ``[N, T]`` tensors, a sort of at most ``max_tokens`` entropies and a few small collectives per
    RL iteration (``benchmarks/monitor_overhead.py`` measures it: about 0.4% of an iteration on CPU).

    State (``state_dict``): ``previous_entropy`` (nats, None before the first iteration),
    ``previous_prediction`` (the ``predicted_dH`` awaiting its observation) and ``pairs`` (every
    ``[predicted, observed]`` so far, for the correlation).

    Args:
        position_buckets: equal-width completion-position buckets for ``entropy_bucket_<b>``.
        top_fraction: fraction of the kept tokens averaged in ``cov_top_mean`` (at least one token).
        low_entropy: threshold of ``entropy_frac_below``, nats.
        max_tokens: most entropies per rank kept for the quantiles (an evenly spaced subsample beyond).
    """

    #: Used in error messages (the metrics are logged under ``monitor/``).
    name = "EntropyMonitor"

    @property
    @typing_extensions.override
    def state_key(self) -> str:
        # The key under which checkpoints written while the monitor was a Regularizer hold its state.
        return "EntropyMonitor[EntropyMonitor]"

    def __init__(
        self,
        position_buckets: int = 4,
        top_fraction: float = 2e-4,
        low_entropy: float = 0.01,
        max_tokens: int = 65536,
    ) -> None:
        for name, value in (("position_buckets", position_buckets), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EntropyMonitor.{name} must be an integer >= 1, got {value!r}")
        check_fraction("EntropyMonitor", "top_fraction", top_fraction)
        if not (isinstance(low_entropy, (int, float)) and math.isfinite(low_entropy) and low_entropy >= 0):
            raise ConfigError(
                f"EntropyMonitor.low_entropy must be a finite number >= 0 nats, got {low_entropy!r}"
            )
        self.position_buckets = position_buckets
        self.top_fraction = float(top_fraction)
        self.low_entropy = float(low_entropy)
        self.max_tokens = max_tokens
        # reduction buffers, reset every iteration; "disable": skip torchmetrics' NaN scan (a device sync)
        self._sums = TokenSums(5 + 2 * position_buckets)
        self._sample = CatMetric(nan_strategy="disable")
        self._cov_sum = TokenSums(1)
        self._cov_top = CatMetric(nan_strategy="disable")
        # state: changed only in on_train_batch_end
        self.previous_entropy: float | None = None
        self.previous_prediction: float | None = None
        self.pairs: list[tuple[float, float]] = []

    def measure(
        self, entropy: Tensor, logprobs: Tensor, advantages: Tensor, mask: Tensor
    ) -> dict[str, float]:
        """The iteration's statistics over the kept tokens of every rank (a collective under DDP).

        Args:
            entropy: ``[N, T]`` token entropy, nats.
            logprobs: ``[N, T]`` log-probs of the sampled tokens.
            advantages: ``[N, T]`` per-token advantages.
            mask: ``[N, T]`` keep-mask.

        Returns:
            ``{key: value}`` for the ``monitor/<key>`` metrics of the module docstring except the dH ones,
            plus ``tokens`` (kept tokens over all ranks); empty when no rank has a kept token. A bucket with
            no kept token is left out.
        """
        keep = mask.bool()
        device = entropy.device
        for metric in (self._sums, self._sample, self._cov_sum, self._cov_top):
            metric.to(device)
            metric.reset()
        zero = torch.zeros((), dtype=torch.float32, device=device)
        # where (not indexing first) so that NaN / -inf at padded positions cannot leak into a sum
        h = torch.where(keep, entropy.detach().float(), zero)  # [N, T]
        lp = torch.where(keep, logprobs.detach().float(), zero)  # [N, T]
        adv = torch.where(keep, advantages.detach().float(), zero)  # [N, T]
        buckets = self.position_buckets
        bucket = position_buckets(keep.shape[1], buckets).to(device).expand_as(keep)  # [N, T]
        bucket_sums = torch.zeros(buckets, device=device).index_add_(0, bucket[keep], h[keep])  # [K]
        bucket_counts = torch.bincount(bucket[keep], minlength=buckets).float()  # [K]
        below = (keep & (h < self.low_entropy)).sum().float()
        first = torch.stack([keep.sum().float(), h.sum(), below, lp.sum(), adv.sum()])
        self._sums.update(torch.cat([first, bucket_sums, bucket_counts]))
        self._sample.update(subsample_evenly(h[keep], self.max_tokens))
        sums = self._sums.compute().reshape(-1).cpu()  # first sync point: global counts and means
        count = float(sums[0])
        if count == 0:
            return {}
        # the second reduction needs the global means: centring on a rank's own would not give Cov(lp, A)
        cov = (lp - float(sums[3]) / count) * (adv - float(sums[4]) / count)  # [N, T]
        cov = cov[keep]  # [n] kept tokens of this rank
        top_count = selection_count(self.top_fraction, round(count))
        self._cov_sum.update(cov.sum().reshape(1))
        self._cov_top.update(torch.topk(cov, min(top_count, cov.numel())).values)
        cov_total = float(self._cov_sum.compute().sum())  # torchmetrics squeezes a 1-element state
        tops = _gathered(self._cov_top)
        sample = _gathered(self._sample)
        quantiles = torch.quantile(sample.float(), torch.tensor(QUANTILES, device=sample.device)).tolist()
        stats = {
            "entropy_mean": float(sums[1]) / count,
            "entropy_median": quantiles[1],
            "entropy_p10": quantiles[0],
            "entropy_p90": quantiles[2],
            "entropy_frac_below": float(sums[2]) / count,
            "cov_mean": cov_total / count,
            "cov_top_mean": top_mean(tops, top_count),
            "tokens": count,
        }
        totals, counts = sums[5 : 5 + buckets], sums[5 + buckets :]
        for index in range(buckets):
            if counts[index] > 0:
                stats[f"entropy_bucket_{index}"] = float(totals[index] / counts[index])
        return stats

    @typing_extensions.override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entropy, logprobs, advantages, mask = token_outputs(outputs, self.name)
        stats = self.measure(entropy, logprobs, advantages, mask)
        if not stats:  # no kept token anywhere: nothing measured, the previous entropy stays the reference
            return
        stats.pop("tokens")
        entropy_now = stats["entropy_mean"]
        if self.previous_entropy is not None:
            observed = entropy_now - self.previous_entropy
            stats["observed_dH"] = observed
            if self.previous_prediction is not None:
                self.pairs.append((self.previous_prediction, observed))
                if len(self.pairs) >= 3:
                    correlation = pearson_correlation(*zip(*self.pairs))
                    if correlation is not None:
                        stats["dH_correlation"] = correlation
        # eta = 1: a proportional predictor (see the module docstring)
        stats["predicted_dH"] = -stats["cov_mean"]
        self.previous_entropy = entropy_now
        self.previous_prediction = stats["predicted_dH"]
        for key, value in stats.items():
            pl_module.log(f"monitor/{key}", value, on_step=True, on_epoch=False, batch_size=1)

    @typing_extensions.override
    def state_dict(self) -> dict[str, Any]:
        return {
            "previous_entropy": self.previous_entropy,
            "previous_prediction": self.previous_prediction,
            "pairs": [list(pair) for pair in self.pairs],
        }

    @typing_extensions.override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [
            key for key in ("previous_entropy", "previous_prediction", "pairs") if key not in state_dict
        ]
        if missing:
            raise ConfigError(f"{self.name} state lacks {missing} (has {sorted(state_dict)})")
        previous, prediction = state_dict["previous_entropy"], state_dict["previous_prediction"]
        self.previous_entropy = None if previous is None else float(previous)
        self.previous_prediction = None if prediction is None else float(prediction)
        self.pairs = [(float(p), float(o)) for p, o in state_dict["pairs"]]


def token_outputs(outputs: Any, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four ``[N, T]`` tensors of `TOKEN_OUTPUTS` from ``training_step``'s outputs.

    Raises:
        ConfigError: naming ``name`` and the missing keys, or the key whose shape differs from the entropy's.
    """
    if not isinstance(outputs, Mapping):
        kind = type(outputs).__name__
        raise ConfigError(
            f"{name} needs training_step to return a dict with {list(TOKEN_OUTPUTS)}, got {kind}"
        )
    missing = [key for key in TOKEN_OUTPUTS if key not in outputs]
    if missing:
        raise ConfigError(f"{name} needs outputs {missing} from training_step, got {sorted(outputs)}")
    tensors = [torch.as_tensor(outputs[key]) for key in TOKEN_OUTPUTS]
    shape = tensors[0].shape
    if len(shape) != 2:
        raise ConfigError(f"{name}: outputs['token_entropy'] must be [N, T], got shape {tuple(shape)}")
    for key, tensor in zip(TOKEN_OUTPUTS[1:], tensors[1:]):
        if tensor.shape != shape:
            raise ConfigError(
                f"{name}: outputs[{key!r}] has shape {tuple(tensor.shape)}, token_entropy has {tuple(shape)}"
            )
    entropy, logprobs, advantages, mask = tensors
    return entropy, logprobs, advantages, mask


def _gathered(metric: CatMetric) -> Tensor:
    """A `CatMetric`'s values over every rank as one ``[k]`` tensor (empty when no rank added any)."""
    values = metric.compute()
    if isinstance(values, Tensor):
        return values
    return torch.cat(values) if values else torch.empty(0, device=metric.device)
