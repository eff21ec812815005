"""`NonfiniteGuard`: skip an optimizer update whose loss or gradient is not finite, and stop after too many.

One NaN in a reward, a bad batch or an overflow in low precision would otherwise poison the weights for good.
An update that is not finite is dropped (gradients cleared, no optimizer or scheduler step) and counted; a
finite update resets the count; ``limit`` non-finite updates in a row stop the run with an error that says what
to do. The count is part of the module's checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lit_entropy.errors import ConfigError, LitEntropyError

log = logging.getLogger(__name__)


class NonfiniteGuard:
    """Counts consecutive non-finite updates; raises when ``limit`` of them come in a row."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"max_consecutive_nonfinite must be >= 1, got {limit}")
        self.limit = limit
        self.in_a_row = 0

    def is_finite(self, grad_norm: Tensor, loss: Tensor) -> bool:
        """True when both are finite (the count resets); otherwise count, warn, and raise at the limit.

        Raises:
            LitEntropyError: the ``limit``-th non-finite update in a row.
        """
        if torch.isfinite(grad_norm) and torch.isfinite(loss):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning(
            f"lit_entropy: non-finite loss or gradient (grad norm {float(grad_norm)}, loss {float(loss)}); "
            f"update skipped ({self.in_a_row} in a row)"
        )
        if self.in_a_row >= self.limit:
            raise LitEntropyError(
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient "
                f"(max_consecutive_nonfinite={self.limit}): lower the learning rate, "
                "check the rewards and the model's dtype, or resume from the last checkpoint"
            )
        return False


__all__ = ["NonfiniteGuard"]
