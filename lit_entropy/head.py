"""Log-probs and entropy straight from the final hidden states and the output head, chunk by chunk.

The largest tensor of an RL step is the fp32 logits: ``[N, T, V]`` is 5 GB for 8 x 1,024 tokens of a
151,936-token vocabulary. `head_logprobs_and_entropy` never holds it. It takes the decoder's final hidden
states ``[N, T, H]`` and the output head, and walks the ``N*T`` rows ``chunk_size`` at a time: project one chunk
to ``[chunk, V]`` logits, reduce them in fp32 to the sampled token's log-prob and the entropy, drop them.

Gradients reach the hidden states through both outputs. For the common head, a frozen ``nn.Linear`` (LoRA
leaves the head alone; tied embeddings are frozen too), a custom autograd function computes the two per-row
gradient directions ``d logprob / d h`` and ``d entropy / d h`` (``[chunk, H]`` each) in the forward, while the
chunk's softmax is at hand, so the backward is two multiply-adds and never recomputes a ``[chunk, V]`` block:

    z = logits / tau,  p = softmax(z),  E = sum_v p_v z_v
    d logprob_t / d logits = (onehot(token) - p) / tau       ->  (W[token] - p @ W) / tau
    d entropy   / d logits = -p * (z - E) / tau              ->  -((p * (z - E)) @ W) / tau

Any other head (a LoRA-wrapped or trainable head, a head with a bias that trains) goes through activation
checkpointing per chunk: correct for every module, at the cost of recomputing the chunk in the backward.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_entropy.errors import ConfigError
from lit_entropy.logprobs import rows_logprobs_and_entropy, token_logprobs_and_entropy
from lit_entropy.model import causal_lm_parts, head_reproduces_logits

if TYPE_CHECKING:
    from lit_entropy.rollout import SequenceBatch

log = logging.getLogger(__name__)

#: fp32 elements of one ``[chunk, V]`` block when ``chunk_size`` is not given: 2**25 (128 MB), i.e. 220 rows of
#: a 151,936-token vocabulary. The peak of the computation is a few such blocks, whatever ``N*T`` is.
DEFAULT_CHUNK_ELEMENTS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 ``[chunk, V]`` block holds about `DEFAULT_CHUNK_ELEMENTS` values."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


def fused_head_parts(policy: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, head)`` of ``policy`` for the fused head, or None (with a warning) to use its own logits.

    None when the parts are not found or when ``head(decoder(x))`` is not the model's logits (soft-capping,
    logit scaling): log-probs then come from the full logits (``lm_parts=None`` below).
    """
    parts = causal_lm_parts(policy)
    if parts is not None and head_reproduces_logits(policy, *parts):
        return parts
    log.warning(
        "lit_entropy: fused_head is on but this model's logits are not its output head applied to "
        "its last hidden state; computing log-probs from the full logits instead"
    )
    return None


def is_frozen_linear(head: nn.Module) -> bool:
    """True for a plain ``nn.Linear`` (not a subclass such as a 4-bit or LoRA layer) with no trainable tensor."""
    return (
        type(head) is nn.Linear
        and head.weight.dtype.is_floating_point
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


def _chunk_statistics(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, p, z_finite - E)`` of one chunk (``[R]``, ``[R]``, ``[R, V]``, ``[R, V]``, fp32)."""
    z = nn.functional.linear(hidden, weight, bias).to(torch.float32).div_(temperature)  # [R, V]
    lse = torch.logsumexp(z, dim=-1)  # [R]
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse  # [R]
    probs = torch.exp(z - lse.unsqueeze(-1))  # [R, V]
    # -inf logits (banned vocabulary entries) have probability 0; zeroing them avoids 0 * -inf = NaN
    z.masked_fill_(z == float("-inf"), 0.0)
    expected = (probs * z).sum(dim=-1)  # [R] E_p[z]
    entropy = lse - expected
    return logprobs, entropy, probs, z.sub_(expected.unsqueeze(-1))


class _FrozenLinearHead(torch.autograd.Function):
    """Chunked log-prob and entropy through a frozen linear head; gradient directions computed in the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [M, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        tokens: Tensor,  # [M]
        temperature: float,
        chunk_size: int,
        need_grad: bool,
        entropy_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        m = hidden.shape[0]
        logprobs = hidden.new_empty(m, dtype=torch.float32)
        entropy = hidden.new_empty(m, dtype=torch.float32)
        grad_lp = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_grad else None  # [M, H]
        grad_ent = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_grad and entropy_grad else None
        for start in range(0, m, chunk_size):
            rows = slice(start, min(start + chunk_size, m))
            lp, ent, probs, centered = _chunk_statistics(
                hidden[rows], weight, bias, tokens[rows], temperature
            )
            logprobs[rows] = lp
            entropy[rows] = ent
            if grad_lp is not None:
                # (onehot - p) @ W = W[token] - p @ W, in the head's dtype like the naive backward's matmul
                p_w = probs.to(weight.dtype) @ weight  # [R, H]
                grad_lp[rows] = (weight[tokens[rows]].to(torch.float32) - p_w.to(torch.float32)) / temperature
            if grad_ent is not None:
                centered.mul_(probs)  # p * (z - E), in place: no further [R, V] block
                grad_ent[rows] = (centered.to(weight.dtype) @ weight).to(torch.float32) / (-temperature)
            del probs, centered
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(*(t for t in (grad_lp, grad_ent) if t is not None))
        ctx.has_grad_ent = grad_ent is not None
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, d_logprobs: Tensor, d_entropy: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        grad_hidden = None
        if saved:
            grad_hidden = d_logprobs.to(torch.float32).unsqueeze(-1) * saved[0]
            if ctx.has_grad_ent and d_entropy is not None:
                grad_hidden = grad_hidden.addcmul_(d_entropy.to(torch.float32).unsqueeze(-1), saved[1])
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None, None, None


def _module_head_rows(
    head: nn.Module, hidden: Tensor, tokens: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    return rows_logprobs_and_entropy(head(hidden), tokens, temperature)


def head_logprobs_and_entropy(
    hidden: Tensor,
    head: nn.Module,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """fp32 log-prob of ``tokens`` and full-vocabulary entropy at ``temperature``, without ``[N, T, V]`` logits.

    Equal to ``logprobs.token_logprobs_and_entropy(head(hidden), tokens, temperature)``, values and gradients,
    to fp32 tolerance.

    Args:
        hidden: ``[N, T, H]`` final hidden states (after the decoder's last norm), any floating dtype.
        head: the output projection (``model.get_output_embeddings()``): hidden -> ``[.., V]`` logits.
        tokens: ``[N, T]`` ids in ``[0, V)``; padded positions must hold a valid id and be masked later.
        temperature: sampling temperature (> 0); logits are divided by it before the softmax.
        chunk_size: rows of ``N*T`` per chunk; ``None`` picks `default_chunk_size` of the vocabulary.
        entropy_grad: keep the gradient path through the entropy. ``False`` returns a detached entropy and, for
            a frozen linear head, saves one ``[chunk, V] x [V, H]`` product per chunk.

    Returns:
        ``(logprobs [N, T], entropy [N, T])``, float32.

    Raises:
        ConfigError: ``temperature <= 0`` or ``chunk_size < 1``.
        ValueError: shapes that do not match, or token ids outside ``[0, V)``.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    if hidden.dim() != 3 or tuple(tokens.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"expected hidden [N, T, H] and tokens [N, T], got hidden {tuple(hidden.shape)} "
            f"and tokens {tuple(tokens.shape)}"
        )
    n, t, h = hidden.shape
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None
    if vocab is None:  # an exotic head: ask it
        vocab = int(head(hidden.new_zeros(1, h)).shape[-1])
    if tokens.numel() > 0:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens must be ids in [0, V={vocab}), got values in [{lo}, {hi}]")
    if n * t == 0:
        empty = hidden.new_zeros((n, t), dtype=torch.float32)
        return empty, empty.clone()
    chunk = chunk_size or default_chunk_size(vocab)
    flat_hidden = hidden.reshape(n * t, h)
    flat_tokens = tokens.reshape(n * t).to(torch.long)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad

    if is_frozen_linear(head):
        logprobs, entropy = _FrozenLinearHead.apply(
            flat_hidden, head.weight, head.bias, flat_tokens, temperature, chunk, need_grad, entropy_grad
        )
    else:
        need_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in head.parameters())
        )
        lp_chunks, ent_chunks = [], []
        for hidden_chunk, token_chunk in zip(
            torch.split(flat_hidden, chunk), torch.split(flat_tokens, chunk), strict=True
        ):
            if need_grad:
                lp, ent = checkpoint(
                    _module_head_rows, head, hidden_chunk, token_chunk, temperature, use_reentrant=False
                )
            else:
                lp, ent = _module_head_rows(head, hidden_chunk, token_chunk, temperature)
            lp_chunks.append(lp)
            ent_chunks.append(ent)
        logprobs, entropy = torch.cat(lp_chunks), torch.cat(ent_chunks)
        if not entropy_grad:
            entropy = entropy.detach()
    return logprobs.reshape(n, t), entropy.reshape(n, t)


def completion_logprobs_and_entropy(
    model: nn.Module,
    lm_parts: tuple[nn.Module, nn.Module] | None,
    batch: SequenceBatch,
    temperature: float,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """fp32 log-probs and entropy of a batch's completion tokens, ``([n, T'], [n, T'])``.

    Only the completion positions are projected to the vocabulary, divided by ``temperature``. With
    ``lm_parts`` (the model's decoder and output head) the projection is chunked (`head_logprobs_and_entropy`);
    without, the model returns those logits itself (``logits_to_keep``). ``entropy_grad=False`` returns a
    detached entropy.
    """
    completion_length = batch.completion_ids.shape[1]
    if lm_parts is not None:
        decoder, head = lm_parts
        hidden = decoder(**batch.model_inputs(), use_cache=False).last_hidden_state
        hidden = hidden[:, -(completion_length + 1) : -1]  # [n, T', H]: position t predicts token t
        return head_logprobs_and_entropy(
            hidden, head, batch.completion_ids, temperature, chunk_size, entropy_grad=entropy_grad
        )
    outputs = model(**batch.model_inputs(), logits_to_keep=completion_length + 1, use_cache=False)
    logits = outputs.logits[:, :-1]  # [n, T', V]: position t predicts completion token t
    logprobs, entropy = token_logprobs_and_entropy(logits, batch.completion_ids, temperature)
    return logprobs, entropy if entropy_grad else entropy.detach()
