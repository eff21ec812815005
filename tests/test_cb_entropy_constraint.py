"""`EntropyConstraint`: target schedules, the dual-ascent multiplier, the Lagrangian term and its gradient,
state and resume, and real fits of the tiny model.

Shapes: ``n`` sequences in a micro-batch, ``m`` in the mini-batch, ``T`` completion length, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from harness import LogRecorder as FakeModule
from harness import make_view, short_fit
from lightning.pytorch import Callback

from lit_entropy.callbacks.entropy_constraint import (
    EntropyConstraint,
    constraint_term,
    dual_ascent_step,
    log_dual_ascent_step,
    proportional_integral_multiplier,
    scheduled_target,
)
from lit_entropy.cli import LitEntropyCLI
from lit_entropy.errors import ConfigError

# --- helpers -------------------------------------------------------------------------------------------


def _end_iteration(callback: Callback, module: FakeModule, entropy: float) -> None:
    outputs = {"entropy": torch.tensor(entropy), "updates": torch.tensor(1.0)}
    callback.on_train_batch_end(None, module, outputs, batch=[], batch_idx=0)


def _toy_view(
    entropy: torch.Tensor | None = None, rows: slice | None = None, mask: torch.Tensor | None = None
):
    """A 2 x 3 mini-batch; token (0, 2) is padding unless ``mask`` says otherwise: 5 kept tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool) if mask is None else mask
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]]) if entropy is None else entropy
    return make_view(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask=mask, entropy=entropy, rows=rows)


# --- pure maths ----------------------------------------------------------------------------------------


def test_constant_schedule_stays_at_start():
    assert scheduled_target(1.3, 1.3, 0, 10, "constant") == 1.3
    assert scheduled_target(1.3, 1.3, 500, 10, "constant") == 1.3


def test_linear_schedule_by_hand():
    # start 2, end 1 over 100 steps: 2 - f, f = step / 100
    assert scheduled_target(2.0, 1.0, 0, 100, "linear") == pytest.approx(2.0)
    assert scheduled_target(2.0, 1.0, 25, 100, "linear") == pytest.approx(1.75)
    assert scheduled_target(2.0, 1.0, 50, 100, "linear") == pytest.approx(1.5)  # midpoint
    assert scheduled_target(2.0, 1.0, 100, 100, "linear") == pytest.approx(1.0)
    assert scheduled_target(2.0, 1.0, 150, 100, "linear") == pytest.approx(1.0)  # clamps at end


def test_cosine_schedule_by_hand():
    # end + (start - end) * (1 + cos(pi f)) / 2
    assert scheduled_target(2.0, 1.0, 0, 100, "cosine") == pytest.approx(2.0)
    # midpoint: cos(pi/2) = 0, so 1 + 1 * 1/2 = 1.5 = (start + end) / 2
    assert scheduled_target(2.0, 1.0, 50, 100, "cosine") == pytest.approx(1.5)
    # f = 1/4: 1 + (1 + cos(pi/4)) / 2 = 1 + (1 + 0.70710678) / 2 = 1.85355339
    assert scheduled_target(2.0, 1.0, 25, 100, "cosine") == pytest.approx(1.85355339)
    assert scheduled_target(2.0, 1.0, 200, 100, "cosine") == pytest.approx(1.0)


def test_exponential_schedule_by_hand():
    # start * (end / start) ** f with start 2, end 0.5: ratio 0.25
    assert scheduled_target(2.0, 0.5, 0, 100, "exponential") == pytest.approx(2.0)
    assert scheduled_target(2.0, 0.5, 25, 100, "exponential") == pytest.approx(1.41421356)  # 2 * 0.25**0.25
    assert scheduled_target(2.0, 0.5, 50, 100, "exponential") == pytest.approx(1.0)  # 2 * 0.25**0.5
    assert scheduled_target(2.0, 0.5, 300, 100, "exponential") == pytest.approx(0.5)  # clamps at end


@pytest.mark.parametrize(
    "args, message",
    [
        ((2.0, 0.0, 1, 10, "exponential"), r"target_end > 0, got 2.0 and 0.0"),
        ((-1.0, 1.0, 1, 10, "exponential"), r"target_start > 0"),
        ((2.0, 1.0, 1, 10, "step"), r"schedule='step' is not one of"),
        ((2.0, 1.0, 1, 0, "linear"), r"decay_steps=0 must be >= 1"),
        ((2.0, 1.0, -1, 10, "linear"), r"step=-1 must be >= 0"),
    ],
)
def test_scheduled_target_rejects_bad_input(args, message):
    with pytest.raises(ConfigError, match=message):
        scheduled_target(*args)


def test_dual_ascent_step_by_hand_and_clamps():
    assert dual_ascent_step(0.2, 0.4, 0.5, 10.0) == pytest.approx(0.4)  # 0.2 + 0.5 * 0.4
    assert dual_ascent_step(0.1, -1.0, 1.0, 10.0) == 0.0  # 0.1 - 1 < 0: clamped at 0
    assert dual_ascent_step(0.4, 1.0, 1.0, 0.5) == 0.5  # 0.4 + 1 > 0.5: clamped at lambda_max
    # two-sided: the lower bound is -lambda_max, so the multiplier goes negative and clamps there
    assert dual_ascent_step(0.1, -1.0, 1.0, 10.0, -10.0) == pytest.approx(-0.9)  # 0.1 - 1
    assert dual_ascent_step(-0.4, -1.0, 1.0, 0.5, -0.5) == -0.5  # -1.4 < -0.5: clamped


def test_log_dual_ascent_step_by_hand_and_cap():
    assert log_dual_ascent_step(0.0, 0.4, 0.5, 10.0) == pytest.approx(0.2)  # 0 + 0.5 * 0.4
    assert log_dual_ascent_step(0.0, -2.0, 0.5, 10.0) == pytest.approx(-1.0)  # never clamped below
    assert log_dual_ascent_step(0.6, 1.0, 0.5, 2.0) == pytest.approx(math.log(2.0))  # 1.1 > log 2 = 0.693


def test_constraint_term_shares_sum_to_the_minibatch_value():
    # Kept entropies 1, 2 | 3, 4, 5 (9 is padding): H_mean = 15 / 5 = 3; lambda (4 - 3) with lambda 0.5 = 0.5.
    whole = _toy_view()
    ones = torch.ones(2, 3)
    value = constraint_term(whole.token_mean(whole.entropy), whole.token_mean(ones), 4.0, 0.5)
    assert value.item() == pytest.approx(0.5)
    # Row 0: 0.5 * (4 * 2/5 - 3/5) = 0.5; row 1: 0.5 * (4 * 3/5 - 12/5) = 0; sum 0.5.
    shares = []
    for rows in (slice(0, 1), slice(1, 2)):
        view = _toy_view(rows=rows)
        shares.append(constraint_term(view.token_mean(view.entropy), view.token_mean(ones[rows]), 4.0, 0.5))
    assert [s.item() for s in shares] == pytest.approx([0.5, 0.0])


# --- construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_start": -0.1}, r"target_start=-0.1 must be >= 0"),
        ({"target_start": 1.0, "target_end": -1.0, "schedule": "linear"}, r"target_end=-1.0 must be >= 0"),
        ({"target_start": float("nan")}, r"target_start=nan must be a finite number"),
        ({"schedule": "step"}, r"schedule='step' is not one of"),
        ({"target_end": 0.5}, r"target_end=0.5 differs from target_start=1.0 but schedule='constant'"),
        (
            {"target_end": 0.0, "schedule": "exponential"},
            r"'exponential' needs target_start > 0 and target_end",
        ),
        ({"decay_steps": 0}, r"decay_steps=0 must be an integer >= 1"),
        ({"lr_lambda": -0.1}, r"lr_lambda=-0.1 must be >= 0"),
        ({"lambda_max": -1.0}, r"lambda_max=-1.0 must be >= 0"),
        ({"lambda_init": 11.0}, r"lambda_init=11.0 must be in \[0, lambda_max=10.0\]"),
        ({"lambda_init": -0.5}, r"lambda_init=-0.5 must be in \[0"),
        ({"log_space": True}, r"lambda_init=0.0 must be > 0 with log_space=True"),
        ({"two_sided": True, "log_space": True, "lambda_init": 1.0}, r"two_sided=True .* log_space=True"),
        ({"two_sided": True, "lambda_init": -11.0}, r"lambda_init=-11.0 must be in \[-10, lambda_max=10.0\]"),
        ({"lambda_kp": -1.0}, r"lambda_kp=-1.0 must be >= 0"),
        ({"lambda_kp": float("inf")}, r"lambda_kp=inf must be a finite number"),
        ({"lambda_kp": 1.0, "log_space": True, "lambda_init": 1.0}, r"lambda_kp=1.0 .* log_space=True"),
    ],
)
def test_construction_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EntropyConstraint(**kwargs)


def test_defaults_follow_the_algorithm_notes():
    constraint = EntropyConstraint()
    assert (constraint.target_start, constraint.target_end, constraint.schedule) == (1.0, 1.0, "constant")
    assert (constraint.lr_lambda, constraint.lambda_max, constraint.multiplier) == (0.1, 10.0, 0.0)
    assert constraint.state_dict() == {"lambda": 0.0, "step": 0, "initial_entropy": None}
    assert EntropyConstraint.needs_entropy_grad


def test_constructible_from_yaml_and_schedule_validated_by_the_cli(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-entropy"])  # LightningCLI warns when pytest's own argv is present

    def config(schedule: str) -> Path:
        path = tmp_path / f"{schedule}.yaml"
        callback = {
            "class_path": "lit_entropy.callbacks.entropy_constraint.EntropyConstraint",
            "init_args": {
                "target_start": 0.9,
                "target_end": 0.3,
                "schedule": schedule,
                "relative": True,
                "two_sided": True,
            },
        }
        path.write_text(
            yaml.safe_dump(
                {
                    "trainer": {"accelerator": "cpu", "max_steps": 1, "callbacks": [callback]},
                    "model": {
                        "class_path": "lit_entropy.GRPO",
                        "init_args": {
                            "policy": {"path": str(tiny_model_dir)},
                            "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                        },
                    },
                    "data": {"class_path": "lit_entropy.CountdownDataModule"},
                }
            )
        )
        return path

    cli = LitEntropyCLI(args=["--config", str(config("cosine"))], run=False)
    [constraint] = [c for c in cli.trainer.callbacks if isinstance(c, EntropyConstraint)]
    assert (constraint.target_start, constraint.target_end, constraint.schedule) == (0.9, 0.3, "cosine")
    assert constraint.relative and constraint.two_sided
    with pytest.raises(SystemExit):  # the Literal rejects an unknown schedule before construction
        LitEntropyCLI(args=["--config", str(config("sawtooth"))], run=False)


# --- the term and its gradient -------------------------------------------------------------------------


def test_gradient_step_on_the_term_raises_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator).mul(3.0).requires_grad_(True)  # [m, T, V] leaf

    def entropy_of(z: torch.Tensor) -> torch.Tensor:  # naive -sum p log p, [m, T]
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

    constraint = EntropyConstraint(target_start=3.0, lambda_init=2.0)  # target above any entropy of V = 5
    view = _toy_view(entropy=entropy_of(logits))
    term = constraint.adjust(view).loss_terms["constraint"]
    # lambda > 0 and H_mean < target: the term is active and positive
    assert term.item() > 0
    term.backward()
    mask = view.mask
    before = entropy_of(logits.detach())[mask].mean()
    after = entropy_of(logits.detach() - 0.1 * logits.grad)[mask].mean()
    assert after > before + 1e-4
    # The padding position gets no gradient.
    assert torch.equal(logits.grad[0, 2], torch.zeros(5))

    # With lambda = 0 the term has no gradient at all.
    logits.grad = None
    idle = EntropyConstraint(target_start=3.0)
    idle.adjust(_toy_view(entropy=entropy_of(logits))).loss_terms["constraint"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_term_value_and_entropy_gradient_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], requires_grad=True)
    constraint = EntropyConstraint(target_start=4.0, lambda_init=0.5)
    adjustment = constraint.adjust(_toy_view(entropy=entropy))
    # 0.5 * (4 - 3) = 0.5; d/dH of -0.5 * sum(H * mask) / 5 = -0.1 on kept tokens
    assert adjustment.loss_terms["constraint"].item() == pytest.approx(0.5)
    adjustment.loss_terms["constraint"].backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1, -0.1, 0.0], [-0.1, -0.1, -0.1]]))
    # metric: this micro-batch's own token mean, 15 / 5 = 3
    assert float(adjustment.metrics["entropy"]) == pytest.approx(3.0)


# --- state ---------------------------------------------------------------------------------------------


def test_dual_ascent_over_three_iterations_by_hand_with_logs():
    constraint = EntropyConstraint(
        target_start=1.0, target_end=0.5, schedule="linear", decay_steps=2, lr_lambda=0.5
    )
    module = FakeModule()
    # targets 1.0, 0.75, 0.5 (linear over 2 iterations), measured 0.6, 0.8, 0.3:
    # it 0: violation 1.0 - 0.6 = 0.4, lambda 0 + 0.5 * 0.4 = 0.2
    # it 1: violation 0.75 - 0.8 = -0.05, lambda 0.2 - 0.025 = 0.175
    # it 2: violation 0.5 - 0.3 = 0.2, lambda 0.175 + 0.1 = 0.275
    expected = [(1.0, 0.4, 0.2), (0.75, -0.05, 0.175), (0.5, 0.2, 0.275)]
    for i, (entropy, (target, violation, lam)) in enumerate(zip([0.6, 0.8, 0.3], expected)):
        assert constraint.target() == pytest.approx(target)
        _end_iteration(constraint, module, entropy)
        assert constraint.step == i + 1
        assert constraint.multiplier == pytest.approx(lam)
        assert module.last("reg/EntropyConstraint/lambda") == pytest.approx(lam)
        assert module.last("reg/EntropyConstraint/target") == pytest.approx(target)
        assert module.last("reg/EntropyConstraint/violation") == pytest.approx(violation)
    assert len(module.logged) == 9  # three keys per iteration
    assert all(
        kwargs == {"on_step": True, "on_epoch": False, "batch_size": 1} for _, _, kwargs in module.logged
    )


def test_two_sided_multiplier_turns_negative_above_target_and_clamps():
    constraint = EntropyConstraint(
        target_start=1.0, lr_lambda=1.0, lambda_init=0.2, lambda_max=0.5, two_sided=True
    )
    module = FakeModule()
    _end_iteration(constraint, module, 1.5)  # 0.2 + (1 - 1.5) = -0.3: allowed below 0
    assert constraint.multiplier == pytest.approx(-0.3)
    _end_iteration(constraint, module, 2.0)  # -0.3 - 1 = -1.3 -> -0.5
    assert constraint.multiplier == -0.5
    _end_iteration(constraint, module, 0.8)  # -0.5 + 0.2 = -0.3
    assert constraint.multiplier == pytest.approx(-0.3)
    assert module.last("reg/EntropyConstraint/lambda") == pytest.approx(-0.3)
    # The one-sided constraint given the same entropies stays at 0, then rises to 0.2.
    one_sided = EntropyConstraint(target_start=1.0, lr_lambda=1.0, lambda_init=0.2, lambda_max=0.5)
    for entropy in (1.5, 2.0, 0.8):
        _end_iteration(one_sided, module, entropy)
    assert one_sided.multiplier == pytest.approx(0.2)


def test_two_sided_term_with_negative_lambda_lowers_entropy():
    # lambda = -0.5, target 1, H_mean 3 (kept entropies 1, 2 | 3, 4, 5): -0.5 * (1 - 3) = 1.0, and the gradient
    # per kept token is -lambda / 5 = +0.1, so a descent step lowers every kept entropy.
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], requires_grad=True)
    constraint = EntropyConstraint(target_start=1.0, lambda_init=-0.5, two_sided=True)
    term = constraint.adjust(_toy_view(entropy=entropy)).loss_terms["constraint"]
    assert term.item() == pytest.approx(1.0)
    term.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[0.1, 0.1, 0.0], [0.1, 0.1, 0.1]]))


def test_proportional_integral_multiplier_by_hand():
    assert proportional_integral_multiplier(0.2, 0.3, 2.0, 0.0, 10.0) == pytest.approx(0.8)
    assert proportional_integral_multiplier(0.2, -0.5, 2.0, 0.0, 10.0) == 0.0  # -0.8, clamped at the floor
    assert proportional_integral_multiplier(0.2, -0.5, 2.0, -10.0, 10.0) == pytest.approx(-0.8)
    assert proportional_integral_multiplier(0.2, 3.0, 4.0, 0.0, 10.0) == 10.0  # 12.2, clamped
    assert proportional_integral_multiplier(0.2, 0.7, 0.0, 0.0, 10.0) == 0.2  # no gain: the integral


def test_proportional_integral_constraint_over_three_iterations_by_hand():
    constraint = EntropyConstraint(
        target_start=1.0, lr_lambda=0.5, lambda_kp=2.0, lambda_max=5.0, two_sided=True
    )
    module = FakeModule()
    # measured 0.6, 1.5, 1.1 against target 1:
    # it 0: violation 0.4, integral 0 + 0.5 * 0.4 = 0.2, lambda 0.2 + 2 * 0.4 = 1.0
    # it 1: violation -0.5, integral 0.2 - 0.25 = -0.05, lambda -0.05 - 1.0 = -1.05
    # it 2: violation -0.1, integral -0.05 - 0.05 = -0.1, lambda -0.1 - 0.2 = -0.3
    expected = [(0.4, 0.2, 1.0), (-0.5, -0.05, -1.05), (-0.1, -0.1, -0.3)]
    for entropy, (violation, integral, lam) in zip([0.6, 1.5, 1.1], expected):
        _end_iteration(constraint, module, entropy)
        assert constraint.multiplier == pytest.approx(lam)
        assert module.last("reg/EntropyConstraint/lambda") == pytest.approx(lam)
        assert module.last("reg/EntropyConstraint/lambda_integral") == pytest.approx(integral)
        assert module.last("reg/EntropyConstraint/violation") == pytest.approx(violation)
    # The term uses the whole multiplier: H_mean of the toy view is 3, so -0.3 * (1 - 3) = 0.6.
    assert constraint.adjust(_toy_view()).loss_terms["constraint"].item() == pytest.approx(0.6)
    # Plain dual ascent on the same entropies ends at the integral alone, and logs no integral part.
    plain = EntropyConstraint(target_start=1.0, lr_lambda=0.5, lambda_max=5.0, two_sided=True)
    plain_module = FakeModule()
    for entropy in (0.6, 1.5, 1.1):
        _end_iteration(plain, plain_module, entropy)
    assert plain.multiplier == pytest.approx(-0.1)
    assert not any(key.endswith("lambda_integral") for key, _, _ in plain_module.logged)


def test_one_sided_proportional_term_is_clamped_at_zero_without_touching_the_integral():
    constraint = EntropyConstraint(target_start=1.0, lr_lambda=1.0, lambda_kp=1.0, lambda_init=0.5)
    module = FakeModule()
    _end_iteration(constraint, module, 1.2)  # integral 0.5 - 0.2 = 0.3, lambda 0.3 - 0.2 = 0.1
    assert constraint.multiplier == pytest.approx(0.1)
    _end_iteration(constraint, module, 2.0)  # integral 0.3 - 1 -> 0, lambda 0 - 1 -> 0
    assert constraint.multiplier == 0.0
    _end_iteration(constraint, module, 0.7)  # integral 0 + 0.3, lambda 0.3 + 0.3 = 0.6
    assert constraint.multiplier == pytest.approx(0.6)
    assert module.last("reg/EntropyConstraint/lambda_integral") == pytest.approx(0.3)


def test_proportional_state_round_trip_and_a_state_saved_without_it():
    constraint = EntropyConstraint(target_start=1.0, lr_lambda=0.5, lambda_kp=2.0)
    _end_iteration(constraint, FakeModule(), 0.6)  # integral 0.2, violation 0.4, lambda 1.0
    state = constraint.state_dict()
    assert state == pytest.approx({"lambda": 0.2, "step": 1, "initial_entropy": None, "violation": 0.4})
    restored = EntropyConstraint(target_start=1.0, lr_lambda=0.5, lambda_kp=2.0)
    restored.load_state_dict(state)
    assert restored.multiplier == pytest.approx(1.0)
    _end_iteration(restored, FakeModule(), 0.9)
    _end_iteration(constraint, FakeModule(), 0.9)
    assert restored.state_dict() == constraint.state_dict()
    plain_state = EntropyConstraint(target_start=1.0).state_dict()
    assert "violation" not in plain_state
    with pytest.raises(ConfigError, match=r"state lacks 'violation'.*lambda_kp=0 \(now 2.0\)"):
        EntropyConstraint(target_start=1.0, lambda_kp=2.0).load_state_dict(plain_state)


def test_multiplier_clamps_at_zero_and_lambda_max():
    constraint = EntropyConstraint(target_start=1.0, lr_lambda=1.0, lambda_init=0.1, lambda_max=0.5)
    module = FakeModule()
    _end_iteration(constraint, module, 2.0)  # 0.1 + (1 - 2) = -0.9 -> 0
    assert constraint.multiplier == 0.0
    _end_iteration(constraint, module, 3.0)  # stays at 0 while entropy is above target
    assert constraint.multiplier == 0.0
    _end_iteration(constraint, module, 0.0)  # 0 + 1 = 1 -> 0.5
    assert constraint.multiplier == 0.5
    _end_iteration(constraint, module, 0.0)
    assert constraint.multiplier == 0.5
    assert [v for k, v, _ in module.logged if k.endswith("/lambda")] == [0.0, 0.0, 0.5, 0.5]


def test_log_space_ascent_by_hand_without_windup():
    constraint = EntropyConstraint(
        target_start=1.0, lr_lambda=0.5, lambda_init=1.0, lambda_max=2.0, log_space=True
    )
    module = FakeModule()
    _end_iteration(constraint, module, 0.6)  # log 0 + 0.5 * 0.4 = 0.2
    assert constraint.multiplier == pytest.approx(math.exp(0.2))
    _end_iteration(constraint, module, 2.0)  # 0.2 - 0.5 = -0.3
    assert constraint.multiplier == pytest.approx(math.exp(-0.3))
    _end_iteration(constraint, module, 0.0)  # -0.3 + 0.5 = 0.2
    _end_iteration(constraint, module, 0.0)  # 0.7 > log 2: capped at log 2
    assert constraint.multiplier == pytest.approx(2.0)
    _end_iteration(constraint, module, 1.5)  # log 2 - 0.25: no wound-up excess to burn first
    assert constraint.multiplier == pytest.approx(2.0 * math.exp(-0.25))
    assert constraint.state_dict()["log_lambda"] == pytest.approx(math.log(2.0) - 0.25)


def test_relative_target_is_set_by_the_first_iteration():
    constraint = EntropyConstraint(
        target_start=0.8, target_end=0.4, schedule="linear", decay_steps=2, relative=True,
        lr_lambda=1.0, lambda_init=0.5,
    )  # fmt: skip
    entropy = torch.ones(2, 3, requires_grad=True)
    # Not measured yet: no target, and the term is 0 with no gradient although lambda = 0.5.
    assert constraint.target() is None
    term = constraint.adjust(_toy_view(entropy=entropy)).loss_terms["constraint"]
    assert term.item() == 0.0
    term.backward()
    assert torch.equal(entropy.grad, torch.zeros(2, 3))

    module = FakeModule()
    _end_iteration(constraint, module, 2.0)  # initial 2.0, target 0.8 * 2 = 1.6, violation -0.4: lambda 0.1
    assert constraint.initial_entropy == 2.0
    assert module.last("reg/EntropyConstraint/target") == pytest.approx(1.6)
    assert constraint.multiplier == pytest.approx(0.1)
    _end_iteration(constraint, module, 1.0)  # target 0.6 * 2 = 1.2, violation 0.2: lambda 0.3
    assert constraint.initial_entropy == 2.0  # measured once only
    assert module.last("reg/EntropyConstraint/target") == pytest.approx(1.2)
    assert constraint.multiplier == pytest.approx(0.3)
    # Step 2: target 0.4 * 2 = 0.8; all 5 kept entropies 1: term 0.3 * (0.8 - 1) = -0.06.
    term = constraint.adjust(_toy_view(entropy=torch.ones(2, 3))).loss_terms["constraint"]
    assert term.item() == pytest.approx(-0.06)


def test_adjust_does_not_change_state():
    constraint = EntropyConstraint(target_start=0.5, relative=True, lambda_init=1.0)
    _end_iteration(constraint, FakeModule(), 1.5)
    before = constraint.state_dict()
    for rows in (slice(0, 1), slice(1, 2), slice(0, 2)):
        constraint.adjust(_toy_view(rows=rows))
        assert constraint.replace_inputs(_toy_view(rows=rows)) is None
    assert constraint.state_dict() == before


def test_state_dict_round_trip_and_mismatched_log_space():
    constraint = EntropyConstraint(target_start=0.5, relative=True, lambda_init=1.0, lr_lambda=0.3)
    _end_iteration(constraint, FakeModule(), 1.5)
    _end_iteration(constraint, FakeModule(), 0.2)
    state = constraint.state_dict()
    assert all(isinstance(v, (float, int)) for v in state.values())
    restored = EntropyConstraint(target_start=0.5, relative=True, lambda_init=1.0, lr_lambda=0.3)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    term = restored.adjust(_toy_view()).loss_terms["constraint"]
    assert term.item() == constraint.adjust(_toy_view()).loss_terms["constraint"].item()
    with pytest.raises(ConfigError, match=r"state lacks 'log_lambda'.*log_space setting \(now True\)"):
        EntropyConstraint(lambda_init=1.0, log_space=True).load_state_dict(state)


def test_a_negative_multiplier_does_not_load_into_a_one_sided_constraint():
    two_sided = EntropyConstraint(target_start=0.5, lr_lambda=1.0, two_sided=True)
    _end_iteration(two_sided, FakeModule(), 1.5)  # 0 + (0.5 - 1.5) = -1
    state = two_sided.state_dict()
    assert state["lambda"] == pytest.approx(-1.0)
    restored = EntropyConstraint(target_start=0.5, lr_lambda=1.0, two_sided=True)
    restored.load_state_dict(state)
    assert restored.multiplier == pytest.approx(-1.0)
    with pytest.raises(
        ConfigError, match=r"lambda=-1.0 < 0, which only two_sided=True reaches \(now False\)"
    ):
        EntropyConstraint(target_start=0.5, lr_lambda=1.0).load_state_dict(state)


def test_missing_entropy_in_outputs_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"needs outputs\['entropy'\].*\['loss'\]"):
        EntropyConstraint().on_train_batch_end(None, FakeModule(), {"loss": torch.tensor(1.0)}, [], 0)


# --- real fits -----------------------------------------------------------------------------------------


class RecordingConstraint(EntropyConstraint):
    """Records the state each ``adjust`` call sees and the state ``load_state_dict`` receives."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, int, float]] = []  # (view.iteration, step, lambda) per adjust call
        self.loaded: dict | None = None

    def adjust(self, view):
        self.seen.append((view.iteration, self.step, self.multiplier))
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
    # lambda starts at 0, so the dual steps are 0.1 * (10 - H) > 0 (entropy of V = 99 is < log 99 = 4.6)
    constraint, probe = RecordingConstraint(target_start=10.0), Probe()
    trainer, _ = short_fit(
        tiny_model_dir, tmp_path, [constraint, probe], iterations=2,
        ppo_epochs=2, minibatch_size=4, microbatch_size=2,
    )  # fmt: skip
    assert probe.updates == [4.0, 4.0]  # 2 epochs x 8 / 4 mini-batches
    # 4 updates x 2 micro-batches = 8 adjust calls per iteration, each seeing the state the previous one left.
    assert len(constraint.seen) == 16
    first_lambda = 0.1 * (10.0 - probe.entropies[0])
    assert constraint.seen[:8] == [(0, 0, 0.0)] * 8
    assert [(i, s) for i, s, _ in constraint.seen[8:]] == [(1, 1)] * 8
    assert all(lam == pytest.approx(first_lambda) for _, _, lam in constraint.seen[8:])
    assert constraint.step == 2
    assert constraint.multiplier == pytest.approx(first_lambda + 0.1 * (10.0 - probe.entropies[1]))
    metrics = trainer.callback_metrics
    assert metrics["reg/RecordingConstraint/lambda"].item() == pytest.approx(constraint.multiplier)
    assert metrics["reg/RecordingConstraint/target"].item() == pytest.approx(10.0)
    assert metrics["reg/RecordingConstraint/violation"].item() == pytest.approx(10.0 - probe.entropies[1])
    assert 0 < metrics["reg/RecordingConstraint/entropy"].item() < math.log(99)
    # Iteration 1's term: lambda * (10 - H_mean), averaged over its 4 updates; H_mean in (0, log 99).
    term = metrics["train/term/RecordingConstraint/constraint"].item()
    assert first_lambda * (10 - math.log(99)) < term < first_lambda * 10


def test_checkpoint_carries_the_state_and_resume_continues(tiny_model_dir, tmp_path):
    kwargs = {"target_start": 0.9, "relative": True, "lr_lambda": 2.0, "lambda_init": 0.5}
    first = RecordingConstraint(**kwargs)
    trainer, _ = short_fit(tiny_model_dir, tmp_path, [first], iterations=2, checkpoint=True)
    saved = first.state_dict()
    assert saved["step"] == 2 and saved["initial_entropy"] is not None
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["callbacks"][first.state_key] == saved

    resumed, probe = RecordingConstraint(**kwargs), Probe()
    short_fit(tiny_model_dir, tmp_path, [resumed, probe], iterations=3, checkpoint=True, ckpt_path=path)
    assert resumed.loaded == saved  # the state at load time is the saved one
    # The third iteration saw the saved state, then took one dual step from it with the same relative target.
    assert resumed.seen and all(s == 2 and lam == saved["lambda"] for _, s, lam in resumed.seen)
    assert resumed.step == 3
    assert resumed.initial_entropy == saved["initial_entropy"]  # not re-measured on resume
    target = 0.9 * saved["initial_entropy"]
    expected = dual_ascent_step(saved["lambda"], target - probe.entropies[-1], 2.0, 10.0)
    assert resumed.multiplier == pytest.approx(expected)
