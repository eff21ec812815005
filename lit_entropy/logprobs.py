"""Log-probabilities of sampled tokens and the entropy of the next-token distribution, from logits, in fp32.

Pure tensor maths like `lit_entropy.functional`: ``[R, V]`` blocks of logits (any dtype) to ``[R]`` values, and
``[N, T, V]`` logits to ``[N, T]`` in chunks with activation checkpointing, never holding fp32 ``[N, T, V]``.
Log-probabilities and entropies are in nats.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_entropy.errors import ConfigError

__all__ = ["rows_logprobs_and_entropy", "token_logprobs_and_entropy"]


def rows_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-prob of ``tokens`` and entropy for a ``[R, V]`` block of logits (R rows, any dtype), in fp32.

    The building block of :func:`token_logprobs_and_entropy` and of the chunked head (``lit_entropy.head``):
    ``logits / temperature`` in fp32, ``lse = logsumexp``, ``logprob = z[token] - lse``,
    ``entropy = lse - sum_v softmax(z)_v z_v`` (``-inf`` entries contribute 0).

    Args:
        logits: ``[R, V]``.
        tokens: ``[R]`` ids.
        temperature: > 0.

    Returns:
        ``(logprobs [R], entropy [R])``, float32.
    """
    z = logits.to(torch.float32) / temperature  # [R, V] fp32
    lse = torch.logsumexp(z, dim=-1)  # [R]
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse  # [R]
    probs = torch.exp(z - lse.unsqueeze(-1))  # [R, V]
    # -inf logits (banned or padded vocabulary entries) have probability 0; zeroing them first avoids
    # 0 * -inf = NaN in sum_v p_v z_v.
    z_finite = z.masked_fill(z == float("-inf"), 0.0)
    entropy = lse - (probs * z_finite).sum(dim=-1)  # [R]
    return logprobs, entropy


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled tokens and full-vocabulary entropy, in fp32, chunked over tokens.

    Logits are cast to fp32 and divided by ``temperature`` *before* the softmax, so both outputs describe
    the distribution that was actually sampled. ``logprob = log_softmax(z)[token]`` and
    ``entropy = logsumexp(z) - sum_v softmax(z)_v * z_v`` (nats).

    The flattened ``N*T`` rows are processed ``chunk_size`` rows at a time, so the fp32 ``[chunk, V]``
    temporaries never exist for the whole batch at once (``N*T*V`` fp32 is ~10 GB for 8k tokens of a
    150k vocabulary). When gradients are needed, each chunk runs under activation checkpointing: the
    forward keeps no fp32 ``[chunk, V]`` tensor for backward, which recomputes it one chunk at a time.
    Gradients reach ``logits`` through both outputs.

    Args:
        logits: ``[N, T, V]`` in any floating dtype (bf16, fp16, fp32).
        tokens: ``[N, T]`` int64 token ids in ``[0, V)``; padded positions must still hold a valid id
            (e.g. the pad id) and be masked out later.
        temperature: sampling temperature (> 0).
        chunk_size: rows of the flattened ``[N*T, V]`` logits processed at a time (>= 1).

    Returns:
        ``(logprobs [N, T], entropy [N, T])``, both float32.

    Raises:
        ConfigError: ``temperature <= 0`` or ``chunk_size < 1``.
        ValueError: shapes that do not match, or token ids outside ``[0, V)``.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected logits [N, T, V] and tokens [N, T], got logits {tuple(logits.shape)} "
            f"and tokens {tuple(tokens.shape)}"
        )
    n, t, v = logits.shape
    if tokens.numel() > 0:
        # One host sync, worth it: an out-of-range gather is a silent wrong answer on some backends and an
        # opaque device-side assert on CUDA.
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= v:
            raise ValueError(f"tokens must be ids in [0, V={v}), got values in [{lo}, {hi}]")

    flat_logits = logits.reshape(n * t, v)  # [N*T, V]
    flat_tokens = tokens.reshape(n * t).to(torch.long)  # [N*T]
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    logprob_chunks: list[Tensor] = []
    entropy_chunks: list[Tensor] = []
    # torch.split (one SplitBackward node) rather than slicing: each slice's backward would allocate a
    # zero-filled full [N*T, V] gradient per chunk.
    for logit_chunk, token_chunk in zip(
        torch.split(flat_logits, chunk_size), torch.split(flat_tokens, chunk_size), strict=True
    ):
        if need_grad:
            lp, ent = checkpoint(
                rows_logprobs_and_entropy, logit_chunk, token_chunk, temperature, use_reentrant=False
            )
        else:
            lp, ent = rows_logprobs_and_entropy(logit_chunk, token_chunk, temperature)
        logprob_chunks.append(lp)
        entropy_chunks.append(ent)

    if not logprob_chunks:  # N*T == 0
        empty = flat_logits.new_zeros((n, t), dtype=torch.float32)
        return empty, empty.clone()
    logprobs = torch.cat(logprob_chunks).reshape(n, t)  # [N, T]
    entropy = torch.cat(entropy_chunks).reshape(n, t)  # [N, T]
    return logprobs, entropy
