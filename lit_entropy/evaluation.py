"""Evaluation maths for sampled completions: the unbiased pass@k estimator and answer-level diversity.

With ``n`` completions sampled for a prompt, ``c`` of them correct, the probability that at least one of ``k``
completions drawn without replacement from the ``n`` is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

(Chen et al. 2021, the Codex paper), an unbiased estimate of the pass@k of the policy. The ratio of binomial
coefficients overflows for realistic ``n`` if formed directly; it is the product
``prod_{i = n-c+1}^{n} (1 - k / i)``, which stays in [0, 1] and is computed in float64.

``distinct_correct`` counts how many *different* correct answers the samples hold: entropy collapse shows up
there before accuracy moves (the policy keeps one answer per prompt and pass@k for large ``k`` stops growing).
``distinct_answers`` counts the different answers among all samples, right or wrong: token entropy can stay
high (hesitation spread over filler tokens) while the policy gives the same answer every time. Both compare
completion *texts*, so "12" and "The answer is 12." count twice; ``distinct_final_answers`` compares the final
answers a reward function reads from the texts (its ``answer_of``), so they count once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError, DataError

__all__ = ["distinct_answers", "distinct_correct", "distinct_final_answers", "pass_at_k"]


def pass_at_k(num_samples: int, num_correct: int | Tensor, k: int) -> float | Tensor:
    """Unbiased pass@k from ``num_correct`` correct completions among ``num_samples`` sampled ones.

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` in float64. It is
    exactly 1 when ``n - c < k`` (every draw of ``k`` contains a correct one) and exactly 0 when ``c = 0``.

    Args:
        num_samples: ``n``, completions sampled per prompt (>= 1).
        num_correct: ``c``, correct completions among them: an int, or an integer-valued tensor of any shape
            (e.g. ``[B]``, one count per prompt), each in ``[0, n]``.
        k: completions drawn, ``1 <= k <= n``.

    Returns:
        A float for an int ``num_correct``; otherwise a float32 tensor of the shape and device of
        ``num_correct`` (average it over prompts for the dataset's pass@k).

    Raises:
        ConfigError: ``num_samples < 1``, ``k < 1`` or ``k > num_samples`` (the estimator needs ``k <= n``).
        DataError: a count outside ``[0, num_samples]`` or not an integer.
    """
    for name, value in (("num_samples", num_samples), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"pass_at_k {name}={value!r} must be an integer >= 1")
    if k > num_samples:
        raise ConfigError(
            f"pass_at_k k={k} must be <= num_samples={num_samples}: sample at least k completions per prompt"
        )
    if isinstance(num_correct, Tensor):
        return _pass_at_k_tensor(num_samples, num_correct, k)
    if isinstance(num_correct, bool) or not isinstance(num_correct, int):
        raise DataError(f"pass_at_k num_correct={num_correct!r} must be an int or a tensor of counts")
    if not 0 <= num_correct <= num_samples:
        raise DataError(f"pass_at_k num_correct={num_correct} must be in [0, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    miss = 1.0  # C(n-c, k) / C(n, k): the probability that all k draws are wrong
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _pass_at_k_tensor(num_samples: int, num_correct: Tensor, k: int) -> Tensor:
    counts = num_correct.detach().to(torch.float64)
    if counts.numel() and (
        bool((counts != counts.round()).any()) or bool(((counts < 0) | (counts > num_samples)).any())
    ):
        bad = counts[(counts != counts.round()) | (counts < 0) | (counts > num_samples)][0].item()
        raise DataError(
            f"pass_at_k num_correct holds {bad}: every count must be an integer in "
            f"[0, num_samples={num_samples}]"
        )
    i = torch.arange(1, num_samples + 1, dtype=torch.float64, device=counts.device)  # [n]
    # factor i enters the product only for i > n - c; the others are neutral (1)
    in_product = i > (num_samples - counts)[..., None]  # [..., n]
    factors = torch.where(in_product, 1.0 - k / i, torch.ones_like(i))  # [..., n]
    miss = factors.prod(dim=-1)  # [...]; exactly 0 when n - c < k (the factor i = k is 0)
    return (1.0 - miss).to(torch.float32)


def distinct_correct(completions: list[str], correct: list[bool]) -> int:
    """The number of distinct completion texts (whitespace-stripped) among the correct completions.

    Args:
        completions: ``N`` completion texts (typically the samples of one prompt).
        correct: ``N`` flags, whether each completion was judged correct.

    Returns:
        ``len({c.strip() for c, ok in zip(completions, correct) if ok})``; 0 when none is correct.

    Raises:
        DataError: the two lists differ in length.
    """
    if len(completions) != len(correct):
        raise DataError(
            f"distinct_correct got {len(completions)} completions but {len(correct)} correct flags"
        )
    return len({text.strip() for text, ok in zip(completions, correct) if ok})


def distinct_answers(completions: list[str]) -> int:
    """The number of distinct completion texts (whitespace-stripped) among ``completions``, correct or not.

    Args:
        completions: the texts sampled for one prompt.

    Returns:
        ``len({c.strip() for c in completions})``; 0 for no completions.
    """
    return len({text.strip() for text in completions})


def distinct_final_answers(completions: list[str], answer_of: Callable[[str], str | None]) -> int:
    """The number of distinct final answers among ``completions``, as ``answer_of`` reads them.

    Args:
        completions: the texts sampled for one prompt.
        answer_of: reads a completion's final answer; ``None`` when it gives none.

    Returns:
        ``len({answer_of(c) for c in completions} - {None})``: a completion without an answer is not one.
    """
    return len({answer_of(text) for text in completions} - {None})
