"""The regularizer extension point: conflict checks, composition of adjustments, their effect on the
micro-batch loss, and the calls the RL module makes during a real fit.

Shapes: ``n`` sequences in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_entropy.demo import CountdownDataModule
from lit_entropy.errors import ConfigError
from lit_entropy.functional import aggregate_loss, clipped_surrogate
from lit_entropy.loss import Loss, microbatch_loss
from lit_entropy.model import LoRA, Policy
from lit_entropy.module import GRPO
from lit_entropy.regularizer import (
    Adjustment,
    MinibatchView,
    Regularizer,
    Replacements,
    combine,
    find_regularizers,
)
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Sampling


def char_code_reward(completion: str, example: dict) -> float:
    """Mean character code / 128: varies between completions, so groups have non-zero advantages."""
    return sum(map(ord, completion)) / (128.0 * max(len(completion), 1))


# --- test regularizers -------------------------------------------------------------------------------


class OwnsAdvantages(Regularizer):
    replaces = ("advantages",)


class AlsoOwnsAdvantages(Regularizer):
    replaces = ("advantages",)


class UndeclaredEpsHigh(Regularizer):
    """Returns an eps_high override without declaring it."""

    def replace_inputs(self, view):
        return Replacements(eps_high=0.3)


class Fixed(Regularizer):
    """Returns fixed overrides / adjustments given at construction (a pure function of its state)."""

    def __init__(
        self, overrides: Replacements | None = None, adjustment: Adjustment | None = None, name=None
    ):
        self._overrides = overrides
        self._adjustment = adjustment
        self._name = name
        self.seen_advantages: list[torch.Tensor] = []

    @property
    def name(self) -> str:
        return self._name or super().name

    def replace_inputs(self, view):
        return self._overrides

    def adjust(self, view):
        self.seen_advantages.append(view.advantages)
        return self._adjustment


class FixedOwner(Fixed):
    replaces = ("advantages", "eps_high")


def _view(**changes) -> MinibatchView:
    """A micro-batch of n = 2 sequences, T = 3, five kept tokens."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]], requires_grad=True)  # [2, 3]
    fields = dict(
        logprobs=logprobs,
        old_logprobs=logprobs.detach().clone(),  # on-policy: ratio 1
        ref_logprobs=None,
        entropy=torch.full((2, 3), 2.0),
        advantages=torch.tensor([[1.0] * 3, [-0.5] * 3]),  # sequence advantage broadcast over T
        mask=torch.tensor([[True, True, False], [True, True, True]]),
        num_tokens=torch.tensor(5),
        num_sequences=2,
        eps_low=0.2,
        eps_high=0.2,
        iteration=0,
        update=0,
        updates_per_iteration=1,
        microbatch_rows=slice(0, 2),
    )
    fields.update(changes)
    return MinibatchView(**fields)


# --- find_regularizers / combine ---------------------------------------------------------------------


def test_two_owners_of_one_override_are_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"OwnsAdvantages and AlsoOwnsAdvantages both replace 'advantages'"):
        find_regularizers([OwnsAdvantages(), Callback(), AlsoOwnsAdvantages()])


def test_find_regularizers_keeps_regularizers_only_in_order():
    first, second = OwnsAdvantages(), Fixed()
    assert find_regularizers([Callback(), first, Callback(), second]) == [first, second]


def test_unknown_declared_override_is_an_error():
    class OwnsTemperature(Regularizer):
        replaces = ("temperature",)

    with pytest.raises(
        ConfigError, match=r"OwnsTemperature declares an unknown input to replace 'temperature'"
    ):
        find_regularizers([OwnsTemperature()])


def test_undeclared_override_at_runtime_is_an_error():
    regularizers = find_regularizers([UndeclaredEpsHigh()])  # nothing declared: passes the static check
    with pytest.raises(ConfigError, match=r"UndeclaredEpsHigh replaced \['eps_high'\] without declaring it"):
        combine(regularizers, _view())


def test_combine_multiplies_weights_adds_penalties_and_namespaces_terms():
    w1, w2 = (
        torch.tensor([[0.5, 2.0, 1.0], [1.0, 0.0, 3.0]]),
        torch.tensor([[4.0, 0.25, 1.0], [2.0, 1.0, 1.0]]),
    )
    p1, p2 = (
        torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 1.0]]),
        torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 0.0]]),
    )
    first = Fixed(adjustment=Adjustment(w1, p1, {"bonus": torch.tensor(0.5)}, {"lambda": 1.0}), name="First")
    second = Fixed(
        adjustment=Adjustment(w2, p2, {"bonus": torch.tensor(-2.0)}, {"lambda": 3.0}), name="Second"
    )
    combined = combine([first, second], _view())
    # Element by element: w1*w2 = [[2, 0.5, 1], [2, 0, 3]]; p1+p2 = [[1.1, 1.2, 1.3], [2, 0.5, 1]].
    assert torch.allclose(combined.token_weights, torch.tensor([[2.0, 0.5, 1.0], [2.0, 0.0, 3.0]]))
    assert torch.allclose(combined.token_penalties, torch.tensor([[1.1, 1.2, 1.3], [2.0, 0.5, 1.0]]))
    assert {key: float(value) for key, value in combined.loss_terms.items()} == {
        "First/bonus": 0.5,
        "Second/bonus": -2.0,
    }
    assert combined.metrics == {"reg/First/lambda": 1.0, "reg/Second/lambda": 3.0}
    # Nothing overridden: the view's own inputs.
    assert torch.equal(combined.advantages, _view().advantages)
    assert (combined.eps_low, combined.eps_high) == (0.2, 0.2)


def test_combine_is_independent_of_order():
    generator = torch.Generator().manual_seed(0)

    def rand():
        return torch.rand(2, 3, generator=generator)

    owner = FixedOwner(
        overrides=Replacements(advantages=rand(), eps_high=0.28),
        adjustment=Adjustment(rand(), rand(), {"a": torch.tensor(0.1)}, {"m": 1.0}),
    )
    other = Fixed(adjustment=Adjustment(rand(), rand(), {"a": torch.tensor(0.2)}, {"m": 2.0}), name="Other")
    view = _view()
    forward, backward = combine([owner, other], view), combine([other, owner], view)
    assert torch.equal(forward.advantages, backward.advantages)
    assert torch.equal(forward.advantages, owner._overrides.advantages)
    assert forward.eps_high == backward.eps_high == 0.28
    assert forward.eps_low == backward.eps_low == 0.2
    assert torch.equal(forward.token_weights, backward.token_weights)
    assert torch.equal(forward.token_penalties, backward.token_penalties)
    assert forward.loss_terms.keys() == backward.loss_terms.keys()
    assert all(torch.equal(forward.loss_terms[k], backward.loss_terms[k]) for k in forward.loss_terms)
    assert forward.metrics == backward.metrics
    # Every adjust saw the view's original advantages, whether it ran before or after the override.
    assert all(seen is view.advantages for seen in owner.seen_advantages + other.seen_advantages)


# --- microbatch_loss ---------------------------------------------------------------------------------


def _loss_and_grad(regularizers, view=None, loss=None):
    view = view or _view()
    result = microbatch_loss(loss or Loss(), view, regularizers, max_length=3)
    result.loss.backward()
    return result, view.logprobs.grad


def test_plain_loss_is_the_token_mean_of_the_surrogate():
    result, grad = _loss_and_grad([])
    # Ratio 1, so the per-token loss is -A: row 0 kept tokens -1, -1; row 1 kept tokens 0.5 x 3.
    # token-mean over 5 kept tokens: (-2 + 1.5) / 5 = -0.1.
    assert result.loss.item() == pytest.approx(-0.1, abs=1e-7)
    # d/dlp of -A * exp(lp - old) / 5 at ratio 1 is -A / 5: -0.2 on row 0, 0.1 on row 1, 0 where masked.
    assert torch.allclose(grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))


def test_zero_token_weights_remove_the_gradient_but_keep_the_normaliser():
    everywhere = Fixed(adjustment=Adjustment(token_weights=torch.zeros(2, 3)))
    result, grad = _loss_and_grad([everywhere])
    assert result.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros(2, 3))

    one_token = torch.ones(2, 3)
    one_token[0, 0] = 0.0
    result, grad = _loss_and_grad([Fixed(adjustment=Adjustment(token_weights=one_token))])
    # Token (0, 0) contributes 0 but still counts: (-1 [token (0, 1)] + 0.5 * 3 [row 1]) / 5 = 0.1 (not / 4).
    assert result.loss.item() == pytest.approx(0.1, abs=1e-7)
    assert torch.allclose(grad, torch.tensor([[0.0, -0.2, 0.0], [0.1, 0.1, 0.1]]))


def test_constant_penalty_on_kept_tokens_adds_exactly_its_value():
    c = 0.75
    base, _ = _loss_and_grad([])
    penalised, grad = _loss_and_grad([Fixed(adjustment=Adjustment(token_penalties=torch.full((2, 3), c)))])
    # sum over 5 kept tokens of c / 5 = c; the masked token (0, 2) adds nothing.
    assert penalised.loss.item() - base.loss.item() == pytest.approx(c, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))  # constant: no gradient

    # In a micro-batch of a larger mini-batch (20 kept tokens), it adds c * 5 / 20: summed over the
    # micro-batches that is c again.
    base, _ = _loss_and_grad([], _view(num_tokens=torch.tensor(20)))
    penalty = Fixed(adjustment=Adjustment(token_penalties=torch.full((2, 3), c)))
    penalised, _ = _loss_and_grad([penalty], _view(num_tokens=torch.tensor(20)))
    assert penalised.loss.item() - base.loss.item() == pytest.approx(c * 5 / 20, abs=1e-6)


def test_loss_term_adds_exactly_its_value():
    base, _ = _loss_and_grad([])
    term = Fixed(adjustment=Adjustment(loss_terms={"bonus": torch.tensor(0.37)}), name="Bonus")
    result, _ = _loss_and_grad([term])
    assert result.loss.item() - base.loss.item() == pytest.approx(0.37, abs=1e-6)
    assert {key: float(value) for key, value in result.loss_terms.items()} == pytest.approx(
        {"Bonus/bonus": 0.37}
    )


def test_loss_term_expressed_with_token_mean_carries_gradient():
    class EntropyBonus(Regularizer):
        needs_entropy_grad = True

        def adjust(self, view):
            return Adjustment(loss_terms={"bonus": -0.1 * view.token_mean(view.entropy)})

    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], requires_grad=True)
    view = _view(entropy=entropy)
    base = microbatch_loss(Loss(), _view(), [], max_length=3)
    result = microbatch_loss(Loss(), view, [EntropyBonus()], max_length=3)
    result.loss.backward()
    # token mean of kept entropies: (1 + 2 + 3 + 4 + 5) / 5 = 3, so the term is -0.3; 9 is masked out.
    assert result.loss.item() - base.loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert torch.allclose(entropy.grad, torch.tensor([[-0.02, -0.02, 0.0], [-0.02, -0.02, -0.02]]))


def test_advantage_and_clip_overrides_are_what_the_surrogate_sees():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
    logprobs = (old + torch.tensor([[0.1, -0.4, 0.0], [0.1, -0.3, 0.25]])).requires_grad_(True)  # off-policy
    view = _view(logprobs=logprobs, old_logprobs=old)
    new_advantages = torch.tensor([[2.0, -1.0, 0.5], [0.7, -0.3, 1.5]])  # per-token, unlike the view's
    owner = FixedOwner(overrides=Replacements(advantages=new_advantages, eps_high=0.05))
    result = microbatch_loss(Loss(), view, [owner], max_length=3)

    expected_tokens, low, high = clipped_surrogate(logprobs, old, new_advantages, eps_low=0.2, eps_high=0.05)
    expected = aggregate_loss(expected_tokens, view.mask, "token-mean", num_tokens=torch.tensor(5))
    assert result.loss.item() == pytest.approx(expected.item(), abs=1e-7)
    assert torch.equal(result.clipped_low, low) and torch.equal(result.clipped_high, high)
    # Token (0, 0): ratio exp(0.1) = 1.105 and A > 0, clipped above 1 + 0.05 but not above 1 + 0.2.
    plain = microbatch_loss(Loss(), view, [], max_length=3)
    assert bool(result.clipped_high[0, 0]) and not bool(plain.clipped_high[0, 0])
    assert plain.loss.item() != pytest.approx(result.loss.item(), abs=1e-4)


# --- a real fit --------------------------------------------------------------------------------------


class Recorder(Regularizer):
    """Counts contract calls; its state (``iterations_seen``) changes only in ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.iterations_seen = 0
        self.adjust_calls: list[tuple[int, int]] = []  # (iteration, update) per call
        self.override_calls = 0
        self.batch_end_calls = 0
        self.views: list[MinibatchView] = []

    def replace_inputs(self, view):
        # The state seen by every micro-batch of iteration i is the one left by iteration i - 1.
        assert self.iterations_seen == view.iteration
        self.override_calls += 1
        return None

    def adjust(self, view):
        assert self.iterations_seen == view.iteration
        self.adjust_calls.append((view.iteration, view.update))
        self.views.append(view)
        return Adjustment(metrics={"update": float(view.update)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_end_calls += 1
        self.iterations_seen += 1


def test_fit_calls_the_contract_once_per_microbatch_and_logs_metrics(tiny_model_dir, tmp_path):
    ppo_epochs, group, prompts, minibatch, microbatch = 2, 2, 2, 2, 1
    num_sequences = prompts * group  # N = 4
    updates = ppo_epochs * (num_sequences // minibatch)  # 4 optimizer updates per RL iteration
    calls_per_iteration = updates * (minibatch // microbatch)  # 8 micro-batches per RL iteration
    iterations = 2

    seed_everything(0)
    recorder = Recorder()
    module = GRPO(
        policy=Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)),
        rewards=[Reward(fn=f"{__name__}.char_code_reward")],
        sampling=Sampling(group_size=group, max_new_tokens=4),
        ppo_epochs=ppo_epochs,
        minibatch_size=minibatch,
        microbatch_size=microbatch,
        learning_rate=1e-2,
        adapter_dir=str(tmp_path / "adapter"),
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=iterations * updates,  # global_step counts optimizer updates
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, CountdownDataModule(batch_size=prompts, num_train=16, num_val=4))

    assert recorder.batch_end_calls == recorder.iterations_seen == iterations
    assert len(recorder.adjust_calls) == recorder.override_calls == iterations * calls_per_iteration
    for iteration in range(iterations):
        updates_seen = [u for i, u in recorder.adjust_calls if i == iteration]
        # two micro-batches per update, updates numbered 0..3 within the iteration
        assert updates_seen == [0, 0, 1, 1, 2, 2, 3, 3]
    for view in recorder.views:
        assert view.logprobs.shape[0] == microbatch
        assert view.num_sequences == minibatch
        assert view.updates_per_iteration == updates
        assert view.microbatch_rows in (slice(0, 1), slice(1, 2))
        assert int(view.num_tokens) >= int(view.mask.sum()) > 0
    # The metric is averaged over the iteration's micro-batches: mean(0, 0, 1, 1, 2, 2, 3, 3) = 1.5.
    assert trainer.callback_metrics["reg/Recorder/update"].item() == pytest.approx(1.5)
    assert trainer.logged_metrics["reg/Recorder/update"].item() == pytest.approx(1.5)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


class SeesClipRange(Regularizer):
    """Records the clip range its ``adjust`` sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def adjust(self, view):
        self.seen.append((view.eps_low, view.eps_high))
        return None


def test_adjustments_see_the_clip_range_in_force_after_overrides():
    # FixedOwner overrides eps_high to 0.5; the configured range is (0.2, 0.2)
    observer = SeesClipRange()
    combined = combine([FixedOwner(overrides=Replacements(eps_high=0.5)), observer], _view())
    assert combined.eps_high == 0.5
    assert observer.seen == [(0.2, 0.5)]
    observer.seen.clear()
    combine([observer], _view())
    assert observer.seen == [(0.2, 0.2)]
