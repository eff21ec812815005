"""`EntropyBonus` and `AdaptiveEntropyBonus`: the bonus term and its gradient, Skywork-OR1's coefficient
update and on/off gate, state and resume, and real fits of the tiny model.

Shapes: ``n`` sequences in a micro-batch, ``m`` in the mini-batch, ``T`` completion length, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import LogRecorder as FakeModule
from harness import make_view, short_fit
from lightning.pytorch import Callback

from lit_entropy.callbacks.entropy_bonus import (
    AdaptiveEntropyBonus,
    EntropyBonus,
    adaptive_coef_step,
    bonus_term,
)
from lit_entropy.errors import ConfigError

# --- helpers -------------------------------------------------------------------------------------------


def _end_iteration(callback: Callback, module: FakeModule, entropy: float) -> None:
    outputs = {"entropy": torch.tensor(entropy), "updates": torch.tensor(1.0)}
    callback.on_train_batch_end(None, module, outputs, batch=[], batch_idx=0)


def _toy_view(entropy: torch.Tensor | None = None, rows: slice | None = None):
    """A 2 x 3 mini-batch; token (0, 2) is padding: 5 kept tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]]) if entropy is None else entropy
    return make_view(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask=mask, entropy=entropy, rows=rows)


def _entropy_of(z: torch.Tensor) -> torch.Tensor:
    """Naive full-vocabulary entropy ``-sum_v p log p``: ``[m, T, V]`` logits -> ``[m, T]`` nats."""
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


# --- pure maths ----------------------------------------------------------------------------------------


def test_bonus_term_shares_sum_to_minus_coef_times_the_token_mean():
    # Kept entropies 1, 2 | 3, 4, 5 (9 is padding): H_mean = 15 / 5 = 3, term -0.01 * 3 = -0.03.
    whole = _toy_view()
    assert bonus_term(whole.token_mean(whole.entropy), 0.01).item() == pytest.approx(-0.03)
    # Row 0: -0.01 * 3/5 = -0.006; row 1: -0.01 * 12/5 = -0.024.
    shares = [
        bonus_term(_toy_view(rows=r).token_mean(_toy_view(rows=r).entropy), 0.01)
        for r in (slice(0, 1), slice(1, 2))
    ]
    assert [s.item() for s in shares] == pytest.approx([-0.006, -0.024])


@pytest.mark.parametrize(
    "coef, measured, expected",
    [
        (0.0, 0.1, 1e-4),  # below target 0.2: up by delta
        (2e-4, 0.3, 1e-4),  # above: down by delta
        (2e-4, 0.2, 1e-4),  # exactly at target counts as not below: down (TRL's <= would go up)
        (0.0, 0.3, 0.0),  # clipped at coef_min 0
        (4.95e-3, 0.1, 5e-3),  # 5.05e-3 clipped at coef_max
    ],
)
def test_adaptive_coef_step_by_hand(coef, measured, expected):
    assert adaptive_coef_step(coef, measured, 0.2, 1e-4, 0.0, 5e-3) == pytest.approx(expected, abs=1e-12)


# --- construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (EntropyBonus, {"coef": -0.001}, r"EntropyBonus coef=-0.001 must be a finite number >= 0"),
        (EntropyBonus, {"coef": float("inf")}, r"coef=inf must be a finite number"),
        (AdaptiveEntropyBonus, {"target": -0.2}, r"AdaptiveEntropyBonus target=-0.2 must be"),
        (AdaptiveEntropyBonus, {"delta": -1e-4}, r"delta=-0.0001 must be a finite number >= 0"),
        (AdaptiveEntropyBonus, {"coef_min": -1.0}, r"coef_min=-1.0 must be"),
        (AdaptiveEntropyBonus, {"coef_min": 1e-2}, r"coef_min=0.01 must be <= coef_max=0.005"),
        (
            AdaptiveEntropyBonus,
            {"coef_init": 1.0},
            r"coef_init=1.0 must be in \[coef_min=0.0, coef_max=0.005\]",
        ),
        (
            AdaptiveEntropyBonus,
            {"coef_init": 0.0, "coef_min": 1e-3},
            r"coef_init=0.0 must be in \[coef_min=0.001",
        ),
        (AdaptiveEntropyBonus, {"target": float("nan")}, r"target=nan must be a finite number"),
    ],
)
def test_construction_errors_name_the_argument_and_value(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def test_defaults_follow_the_algorithm_notes():
    assert EntropyBonus().coef == 0.001
    adaptive = AdaptiveEntropyBonus()
    assert (adaptive.target, adaptive.delta, adaptive.coef_max) == (0.2, 1e-4, 5e-3)
    assert adaptive.state_dict() == {"coef": 0.0, "active": True}
    assert EntropyBonus.needs_entropy_grad and AdaptiveEntropyBonus.needs_entropy_grad


# --- the term and its gradient -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: EntropyBonus(coef=0.5), lambda: AdaptiveEntropyBonus(coef_init=5e-3)]
)
def test_gradient_step_on_the_bonus_raises_entropy(make):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator).mul(3.0).requires_grad_(True)  # [m, T, V] leaf
    view = _toy_view(entropy=_entropy_of(logits))
    term = make().adjust(view).loss_terms["bonus"]
    assert term.item() < 0
    term.backward()
    before = _entropy_of(logits.detach())[view.mask].mean()
    after = _entropy_of(logits.detach() - 1.0 * logits.grad)[view.mask].mean()
    assert after > before + 1e-5
    assert torch.equal(logits.grad[0, 2], torch.zeros(5))  # padding gets no gradient


def test_bonus_value_gradient_and_metric_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], requires_grad=True)
    adjustment = EntropyBonus(coef=0.5).adjust(_toy_view(entropy=entropy))
    # -0.5 * 15 / 5 = -1.5; d/dH = -0.5 / 5 = -0.1 on kept tokens
    assert adjustment.loss_terms["bonus"].item() == pytest.approx(-1.5)
    adjustment.loss_terms["bonus"].backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1, -0.1, 0.0], [-0.1, -0.1, -0.1]]))
    assert float(adjustment.metrics["entropy"]) == pytest.approx(3.0)
    # Row 1 alone: its own token mean (3 + 4 + 5) / 3 = 4, not its share of the mini-batch mean.
    assert float(EntropyBonus().adjust(_toy_view(rows=slice(1, 2))).metrics["entropy"]) == pytest.approx(4.0)


def test_static_bonus_logs_its_coefficient_once_per_iteration():
    module = FakeModule()
    bonus = EntropyBonus(coef=0.02)
    _end_iteration(bonus, module, 1.0)
    assert module.logged == [
        ("reg/EntropyBonus/coef", 0.02, {"on_step": True, "on_epoch": False, "batch_size": 1})
    ]
    assert bonus.coef == 0.02


# --- adaptive state ------------------------------------------------------------------------------------


def test_adaptive_sequence_over_three_iterations_by_hand_with_logs():
    adaptive = AdaptiveEntropyBonus(target=0.2, delta=1e-4, coef_max=1.5e-4)
    module = FakeModule()
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    # it 0: 0.1 < 0.2: coef 1e-4, active
    # it 1: 0.15 < 0.2: 2e-4 clipped at 1.5e-4, active
    # it 2: 0.3 >= 0.2: 0.5e-4, inactive
    for measured, coef, active in [(0.1, 1e-4, True), (0.15, 1.5e-4, True), (0.3, 0.5e-4, False)]:
        _end_iteration(adaptive, module, measured)
        assert adaptive.coef == pytest.approx(coef)
        assert adaptive.active is active
        # The next iteration's term: -coef * 3 while active, 0 while not.
        term = adaptive.adjust(_toy_view(entropy=entropy)).loss_terms["bonus"].item()
        assert term == pytest.approx(-3 * coef if active else 0.0)
    assert module.values("reg/AdaptiveEntropyBonus/coef") == pytest.approx([1e-4, 1.5e-4, 0.5e-4])
    assert module.values("reg/AdaptiveEntropyBonus/active") == [1.0, 1.0, 0.0]


def test_inactive_bonus_has_no_gradient_and_reactivates_below_target():
    adaptive = AdaptiveEntropyBonus(target=0.2, delta=1e-3, coef_init=3e-3)
    _end_iteration(adaptive, FakeModule(), 0.5)  # above target: coef 2e-3, off
    entropy = torch.ones(2, 3, requires_grad=True)
    term = adaptive.adjust(_toy_view(entropy=entropy)).loss_terms["bonus"]
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(entropy.grad, torch.zeros(2, 3))
    _end_iteration(adaptive, FakeModule(), 0.1)  # below: coef 3e-3, on
    assert adaptive.active and adaptive.coef == pytest.approx(3e-3)
    # all 5 kept entropies are 1: -3e-3 * 1
    assert adaptive.adjust(_toy_view(entropy=torch.ones(2, 3))).loss_terms["bonus"].item() == pytest.approx(
        -3e-3
    )


def test_adjust_does_not_change_state():
    adaptive = AdaptiveEntropyBonus(coef_init=1e-3)
    _end_iteration(adaptive, FakeModule(), 0.1)
    before = adaptive.state_dict()
    for rows in (slice(0, 1), slice(1, 2), slice(0, 2)):
        adaptive.adjust(_toy_view(rows=rows))
        assert adaptive.replace_inputs(_toy_view(rows=rows)) is None
    assert adaptive.state_dict() == before
    static = EntropyBonus(coef=0.3)
    static.adjust(_toy_view())
    assert static.coef == 0.3 and static.state_dict() == {}


def test_state_dict_round_trip_and_missing_key():
    adaptive = AdaptiveEntropyBonus(coef_init=1e-3)
    _end_iteration(adaptive, FakeModule(), 0.5)
    state = adaptive.state_dict()
    assert state == {"coef": pytest.approx(0.9e-3), "active": False}
    restored = AdaptiveEntropyBonus(coef_init=1e-3)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    with pytest.raises(ConfigError, match=r"AdaptiveEntropyBonus state lacks 'active'"):
        AdaptiveEntropyBonus().load_state_dict({"coef": 1e-3})


def test_missing_entropy_in_outputs_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"AdaptiveEntropyBonus needs outputs\['entropy'\]"):
        AdaptiveEntropyBonus().on_train_batch_end(None, FakeModule(), {"loss": torch.tensor(1.0)}, [], 0)


# --- real fits -----------------------------------------------------------------------------------------


class RecordingAdaptive(AdaptiveEntropyBonus):
    """Records the coefficient each ``adjust`` call sees and the state ``load_state_dict`` receives."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, float]] = []  # (view.iteration, coef) per adjust call
        self.loaded: dict | None = None

    def adjust(self, view):
        self.seen.append((view.iteration, self.coef))
        return super().adjust(view)

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)
        super().load_state_dict(state_dict)


class Probe(Callback):
    """Records what training_step handed to the callbacks."""

    def __init__(self) -> None:
        self.entropies: list[float] = []
        self.updates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.entropies.append(float(outputs["entropy"]))
        self.updates.append(float(outputs["updates"]))


def test_fit_updates_state_once_per_iteration_and_logs(tiny_model_dir, tmp_path):
    # target 100 nats is above any entropy of V = 99 (< log 99 = 4.6): coef rises by delta every iteration
    adaptive, static, probe = (
        RecordingAdaptive(target=100.0, delta=1e-3, coef_max=1.0),
        EntropyBonus(0.01),
        Probe(),
    )
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path, [adaptive, static, probe], iterations=2,
        ppo_epochs=2, minibatch_size=4, microbatch_size=2,
    )  # fmt: skip
    assert probe.updates == [4.0, 4.0]
    # 4 updates x 2 micro-batches per iteration; once per iteration: 2 * delta after 2 iterations, not 16.
    assert adaptive.seen == [(0, 0.0)] * 8 + [(1, pytest.approx(1e-3))] * 8
    assert adaptive.coef == pytest.approx(2e-3)
    assert adaptive.active
    metrics = trainer.callback_metrics
    assert metrics["reg/RecordingAdaptive/coef"].item() == pytest.approx(2e-3)
    assert metrics["reg/RecordingAdaptive/active"].item() == 1.0
    assert metrics["reg/EntropyBonus/coef"].item() == pytest.approx(0.01)
    assert 0 < metrics["reg/EntropyBonus/entropy"].item() < math.log(99)
    # -0.01 * H_mean with H_mean in (0, log 99), averaged over the updates
    assert -0.01 * math.log(99) < metrics["train/term/EntropyBonus/bonus"].item() < 0
    assert -1e-3 * math.log(99) < metrics["train/term/RecordingAdaptive/bonus"].item() < 0


def test_checkpoint_carries_the_state_and_resume_continues(tiny_model_dir, tmp_path):
    kwargs = {"target": 100.0, "delta": 1e-3, "coef_max": 1.0}
    first = RecordingAdaptive(**kwargs)
    trainer, _ = short_fit(tiny_model_dir, tmp_path, [first], iterations=2, checkpoint=True)
    saved = first.state_dict()
    assert saved == {"coef": pytest.approx(2e-3), "active": True}
    path = trainer.checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=False)["callbacks"][first.state_key] == saved

    resumed = RecordingAdaptive(**kwargs)
    short_fit(tiny_model_dir, tmp_path, [resumed], iterations=3, checkpoint=True, ckpt_path=path)
    assert resumed.loaded == saved
    assert resumed.seen and all(coef == saved["coef"] for _, coef in resumed.seen)  # the third iteration
    assert resumed.coef == pytest.approx(3e-3)  # one more step from the saved coefficient, not from coef_init
