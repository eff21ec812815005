"""Every compatible entropy callback stacked in one fit, and the one incompatible pair refused."""

from __future__ import annotations

import math

import pytest
from harness import short_fit

from lit_entropy.callbacks import (
    ADAPO,
    REPO,
    AdaptiveEntropyBonus,
    ClipCov,
    EntropyBonus,
    EntropyConstraint,
    HighEntropyTokens,
    KLCov,
)
from lit_entropy.errors import ConfigError


def _all_but(excluded: type) -> list:
    callbacks = [
        EntropyConstraint(target_start=5.0, lr_lambda=0.5),
        EntropyBonus(coef=0.01),
        AdaptiveEntropyBonus(target=5.0, delta=0.01, coef_max=0.05),
        ClipCov(ratio=0.2, cov_lb=-10.0, cov_ub=10.0),
        KLCov(ratio=0.2),
        REPO(variant="R"),
        ADAPO(),
        HighEntropyTokens(rho=0.5),
    ]
    return [callback for callback in callbacks if not isinstance(callback, excluded)]


@pytest.mark.parametrize("excluded", [ADAPO, KLCov], ids=["with-KLCov", "with-ADAPO"])
def test_all_compatible_callbacks_stack_in_one_fit(tiny_model_dir, tmp_path, excluded):
    callbacks = _all_but(excluded)
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path, callbacks, iterations=2, ppo_epochs=2, minibatch_size=4, microbatch_size=2
    )
    assert trainer.global_step == 8  # 2 iterations x 2 epochs x 2 mini-batches
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    for callback in callbacks:
        assert any(key.startswith(f"reg/{callback.name}/") for key in metrics), callback.name
    # the multiplier grew: the measured entropy of the tiny model (~4.6 nats) is below the 5.0 target
    constraint = next(c for c in callbacks if isinstance(c, EntropyConstraint))
    assert constraint.multiplier > 0


def test_klcov_and_adapo_both_own_the_clip_range(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="KLCov.*ADAPO|ADAPO.*KLCov"):
        short_fit(tiny_model_dir, tmp_path, [KLCov(), ADAPO()], iterations=1)
