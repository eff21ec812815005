"""REPO: per-token advantages (R and D variants) against hand computations, the zeta controller, purity
of the contract, state round-trips (state_dict, checkpoint + resumed fit), once-per-iteration updates,
composition with ADAPO, construction from YAML.

Shapes: ``m`` sequences in the mini-batch, ``T`` completion length.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from harness import EntropyLog, LogRecorder, StateAtStart, make_view, short_fit

from lit_entropy.callbacks.adapo import ADAPO
from lit_entropy.callbacks.repo import (
    REPO,
    next_zeta,
    predicted_entropy_change,
    repo_d_advantages,
    repo_d_beta,
    repo_r_advantages,
    token_covariance,
)
from lit_entropy.cli import LitEntropyCLI
from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import Regularizer, combine, find_regularizers

# --- helpers -----------------------------------------------------------------------------------------


class OwnsAdvantages(Regularizer):
    replaces = ("advantages",)


def _step(callback, entropy: float, module=None):
    callback.on_train_batch_end(None, module or LogRecorder(), {"entropy": torch.tensor(entropy)}, None, 0)


# REPO-R example, m = 2, T = 4, zeta = 0.05, floor -20; token (1, 3) is padding.
R_ADVANTAGES = torch.tensor([[1.0, 1.0, -2.0, -2.0], [0.0, 0.5, -1.0, 3.0]])
R_LOGPROBS = torch.tensor([[-2.0, -30.0, -2.0, -30.0], [-1.0, -4.0, -0.5, -1.0]])
R_MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])
# (0,0) A=1,  lp=-2:              1 * (1 - 0.05*-2)  = 1.1
# (0,1) A=1,  lp=-30 -> -20:      1 * (1 - 0.05*-20) = 2.0
# (0,2) A=-2, lp=-2:             -2 * (1 + 0.05*-2)  = -1.8
# (0,3) A=-2, lp=-30 -> -20:     -2 * (1 + 0.05*-20) = 0 (exactly at the sign boundary)
# (1,0) A=0:                      unchanged 0
# (1,1) A=0.5, lp=-4:           0.5 * (1 + 0.2)      = 0.6
# (1,2) A=-1, lp=-0.5:           -1 * (1 - 0.025)    = -0.975
# (1,3) padding:                  unchanged 3.0
R_EXPECTED = torch.tensor([[1.1, 2.0, -1.8, 0.0], [0.0, 0.6, -0.975, 3.0]])

# REPO-D example, 2 x 2, all kept. mean lp = (-1 - 2 - 3 - 2)/4 = -2, mean A = 0.
# cov = (lp + 2) * A = [[1*1, 0*1], [-1*-1, 0*-1]] = [[1, 0], [1, 0]]; mean 0.5 -> dH_hat = -0.5.
# zeta = 0.1: beta = -zeta * dH_hat = 0.05.  lp + H = [[-0.5, -1.0], [-0.5, -0.5]].
# A' = A - 0.05 * (lp + H) = [[1.025, 1.05], [-0.975, -0.975]].
D_LOGPROBS = torch.tensor([[-1.0, -2.0], [-3.0, -2.0]])
D_ADVANTAGES = torch.tensor([1.0, -1.0])
D_ENTROPY = torch.tensor([[0.5, 1.0], [2.5, 1.5]])
D_EXPECTED = torch.tensor([[1.025, 1.05], [-0.975, -0.975]])


# --- pure maths --------------------------------------------------------------------------------------


def test_repo_r_advantages_by_hand_with_floor_zero_advantage_and_padding():
    result = repo_r_advantages(R_ADVANTAGES, R_LOGPROBS, R_MASK, zeta=0.05, logprob_floor=-20.0)
    assert torch.allclose(result, R_EXPECTED, atol=1e-6)
    assert result[1, 0] == 0.0 and result[1, 3] == 3.0  # A = 0 and padding exactly unchanged
    # Without the floor, token (0, 1) would be 1 * (1 + 0.05*30) = 2.5.
    unfloored = repo_r_advantages(R_ADVANTAGES, R_LOGPROBS, R_MASK, zeta=0.05, logprob_floor=-100.0)
    assert unfloored[0, 1].item() == pytest.approx(2.5)


def test_repo_r_sign_never_flips():
    advantages = torch.tensor([[1.0, -2.0, 1.0, -2.0]])
    logprobs = torch.tensor([[-30.0, -30.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # zeta = +0.05, floor -40: A=-2, lp=-30: -2 * (1 - 1.5) = +1 -> clamped to 0; A=1 grows: 1 * 2.5.
    positive = repo_r_advantages(advantages, logprobs, mask, zeta=0.05, logprob_floor=-40.0)
    assert torch.allclose(positive, torch.tensor([[2.5, 0.0, 1.05, -1.9]]))
    # zeta = -0.05 (two-way): A=1, lp=-30: 1 * (1 - 1.5) = -0.5 -> clamped to 0; A=-2: -2 * 2.5 = -5.
    # lp=-1: A=1 -> 1 * (1 - 0.05) = 0.95; A=-2 -> -2 * (1 + 0.05) = -2.1.
    negative = repo_r_advantages(advantages, logprobs, mask, zeta=-0.05, logprob_floor=-40.0)
    assert torch.allclose(negative, torch.tensor([[0.0, -5.0, 0.95, -2.1]]))
    assert bool(((positive * advantages) >= 0).all()) and bool(((negative * advantages) >= 0).all())


def test_repo_r_ignores_gradient_and_nan_on_padding():
    logprobs = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    result = repo_r_advantages(torch.tensor([[2.0, 2.0]]), logprobs, torch.tensor([[True, False]]), 0.1)
    assert not result.requires_grad  # lp is detached: A' is a constant of the loss
    assert torch.equal(result, torch.tensor([[2.2, 2.0]]))  # 2 * (1 + 0.1); the NaN pad is not used


def test_token_covariance_and_predicted_entropy_change_by_hand():
    advantages = D_ADVANTAGES[:, None].expand(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert torch.allclose(
        token_covariance(D_LOGPROBS, advantages, mask), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    )
    assert predicted_entropy_change(D_LOGPROBS, advantages, mask).item() == pytest.approx(-0.5)
    # Masking token (1, 1): mean lp = -2, mean A = (1 + 1 - 1)/3 = 1/3;
    # cov = (1)(2/3), (0)(2/3), (-1)(-4/3) = 2/3, 0, 4/3; mean over 3 = 2/3 -> dH_hat = -2/3.
    mask[1, 1] = False
    cov = token_covariance(D_LOGPROBS, advantages, mask)
    assert torch.allclose(cov, torch.tensor([[2 / 3, 0.0], [4 / 3, 0.0]]))
    assert predicted_entropy_change(D_LOGPROBS, advantages, mask).item() == pytest.approx(-2 / 3)
    assert predicted_entropy_change(D_LOGPROBS, advantages, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_repo_d_advantages_by_hand():
    advantages = D_ADVANTAGES[:, None].expand(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    beta = repo_d_beta(0.1, predicted_entropy_change(D_LOGPROBS, advantages, mask))
    assert beta.item() == pytest.approx(0.05)  # predicted drop of 0.5 -> a bonus
    result = repo_d_advantages(advantages, D_LOGPROBS, D_ENTROPY, mask, beta)
    assert torch.allclose(result, D_EXPECTED, atol=1e-6)
    # Padding keeps its advantage.
    padded = repo_d_advantages(
        advantages, D_LOGPROBS, D_ENTROPY, torch.tensor([[True, False], [True, True]]), beta
    )
    assert padded[0, 1].item() == 1.0 and padded[0, 0].item() == pytest.approx(1.025)


def test_next_zeta_doubles_below_halves_above_and_clamps():
    # R bounds [1e-4, 0.05]
    assert next_zeta(0.02, 0.8, 1.0, 1e-4, 0.05) == pytest.approx(0.04)  # below target: x2
    assert next_zeta(0.04, 0.8, 1.0, 1e-4, 0.05) == 0.05  # 0.08 clamped to zeta_max
    assert next_zeta(0.02, 1.2, 1.0, 1e-4, 0.05) == pytest.approx(0.01)  # above: /2
    assert next_zeta(1.5e-4, 1.2, 1.0, 1e-4, 0.05) == 1e-4  # 7.5e-5 clamped to zeta_min
    assert next_zeta(1e-4, 1.2, 1.0, 1e-4, 0.05) == 1e-4  # at the minimum, one-way: stays
    assert next_zeta(1e-4, 1.2, 1.0, 1e-4, 0.05, two_way=True) == -1e-4  # two-way: flips
    assert next_zeta(-1e-4, 1.2, 1.0, 1e-4, 0.05, two_way=True) == -2e-4  # negative and above: |x2|
    assert next_zeta(-2e-4, 0.8, 1.0, 1e-4, 0.05, two_way=True) == -1e-4  # negative and below: |/2|
    assert next_zeta(-1e-4, 0.8, 1.0, 1e-4, 0.05, two_way=True) == 1e-4  # ... and flips back
    assert next_zeta(0.02, 1.0, 1.0, 1e-4, 0.05) == 0.02  # on target: unchanged


# --- the callback ------------------------------------------------------------------------------------


def test_defaults_by_variant():
    r, d = REPO(), REPO(variant="D")
    assert (r.zeta, r.zeta_min, r.zeta_max) == (1e-3, 1e-4, 0.05)
    assert (d.zeta, d.zeta_min, d.zeta_max) == (1e-2, 1e-3, 10.0)
    assert REPO.replaces == ("advantages",)
    # Only REPO-D needs the mini-batch statistics (REPO-R spares the extra forward).
    assert (r.needs_minibatch_stats, d.needs_minibatch_stats) == (False, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "X"}, r"REPO.variant must be 'R' or 'D', got 'X'"),
        ({"zeta_min": 0.0}, r"REPO.zeta_min must be a finite number > 0, got 0.0"),
        ({"zeta_min": -1e-3}, r"REPO.zeta_min must be a finite number > 0, got -0.001"),
        ({"zeta_min": 0.1, "zeta_max": 0.01}, r"REPO.zeta_max must be finite and >= zeta_min.*zeta_max=0.01"),
        ({"zeta_init": 0.5}, r"REPO.zeta_init must satisfy .* got zeta_init=0.5 with \[0.0001, 0.05\]"),
        ({"zeta_init": 1e-5}, r"REPO.zeta_init must satisfy .* got zeta_init=1e-05"),
        ({"zeta_init": -1e-3}, r"REPO.zeta_init=-0.001 is negative: that needs two_way=True"),
        ({"logprob_floor": 0.0}, r"REPO.logprob_floor must be < 0 \(nats\), got 0.0"),
        ({"zeta_max": float("nan")}, r"REPO.zeta_max must be finite"),
    ],
)
def test_construction_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        REPO(**kwargs)


def test_negative_zeta_init_is_allowed_two_way():
    assert REPO(zeta_init=-1e-3, two_way=True).zeta == -1e-3


def test_override_and_adjust_r_by_hand_and_pure():
    repo = REPO(zeta_init=0.05)
    view = make_view(R_LOGPROBS.clone().requires_grad_(True), R_ADVANTAGES, mask=R_MASK)
    before = repo.state_dict()
    overrides = repo.replace_inputs(view)
    adjustment = repo.adjust(view)
    assert repo.state_dict() == before
    assert overrides.owned() == ["advantages"]
    assert torch.allclose(overrides.advantages, R_EXPECTED, atol=1e-6)
    # mean |A' - A| over the 7 kept tokens: (0.1 + 1.0 + 0.2 + 2.0 + 0 + 0.1 + 0.025) / 7 = 3.425 / 7
    assert float(adjustment.metrics["advantage_change"]) == pytest.approx(3.425 / 7, abs=1e-6)
    assert (
        adjustment.token_weights is None and adjustment.token_penalties is None and not adjustment.loss_terms
    )


@pytest.mark.parametrize("variant", ["R", "D"])
def test_advantages_are_computed_once_per_microbatch(monkeypatch, variant):
    import lit_entropy.callbacks.repo as repo_module

    name = "repo_r_advantages" if variant == "R" else "repo_d_advantages"
    calls = []
    original = getattr(repo_module, name)
    monkeypatch.setattr(repo_module, name, lambda *args: calls.append(1) or original(*args))
    repo = REPO(variant=variant)
    view = make_view(R_LOGPROBS.clone(), R_ADVANTAGES, mask=R_MASK)
    first = repo.replace_inputs(view).advantages
    repo.adjust(view)
    assert len(calls) == 1
    repo.zeta *= 2  # new state: computed again, with the new zeta
    assert len(calls) == 1 and not torch.equal(repo.replace_inputs(view).advantages, first)
    assert len(calls) == 2
    repo.replace_inputs(make_view(R_LOGPROBS.clone(), R_ADVANTAGES, mask=R_MASK))  # another micro-batch
    assert len(calls) == 3


def test_repo_d_uses_the_whole_minibatch_for_every_microbatch():
    repo = REPO(variant="D", zeta_init=0.1)
    full = make_view(D_LOGPROBS, D_ADVANTAGES, entropy=D_ENTROPY)
    assert torch.allclose(repo.replace_inputs(full).advantages, D_EXPECTED, atol=1e-6)
    # Row 1 alone as a micro-batch: beta still comes from both rows (0.05). Over row 1 alone the covariance
    # would be 0 (A constant), which would leave A unchanged at -1.
    second = make_view(D_LOGPROBS, D_ADVANTAGES, entropy=D_ENTROPY, rows=slice(1, 2))
    before = repo.state_dict()
    assert torch.allclose(repo.replace_inputs(second).advantages, D_EXPECTED[1:], atol=1e-6)
    metrics = repo.adjust(second).metrics
    assert repo.state_dict() == before
    assert float(metrics["beta"]) == pytest.approx(0.05)
    assert float(metrics["entropy_change"]) == pytest.approx(-0.5)
    assert float(metrics["advantage_change"]) == pytest.approx(0.025)  # |-0.975 - (-1)|


def test_controller_sequence_by_hand_and_logs():
    repo, module = REPO(zeta_init=0.02), LogRecorder()
    # it 1: entropy 1.0 becomes the target, on target -> 0.02; it 2: 0.8 < 1 -> 0.04;
    # it 3: 0.7 < 1 -> 0.08, clamped to 0.05; it 4: 1.2 > 1 -> 0.025.
    zetas = []
    for entropy in (1.0, 0.8, 0.7, 1.2):
        _step(repo, entropy, module)
        zetas.append(repo.zeta)
    assert zetas == pytest.approx([0.02, 0.04, 0.05, 0.025])
    assert repo.state_dict() == {"zeta": pytest.approx(0.025), "target": 1.0, "iterations": 4}
    assert [name for name, _, _ in module.logged] == ["reg/REPO/zeta", "reg/REPO/target"] * 4
    assert [value for _, value, _ in module.logged] == pytest.approx(
        [0.02, 1.0, 0.04, 1.0, 0.05, 1.0, 0.025, 1.0]
    )
    assert all(kw == {"on_step": True, "on_epoch": False, "batch_size": 1} for _, _, kw in module.logged)


@pytest.mark.parametrize(
    ("two_way", "expected"), [(True, [2e-4, 1e-4, -1e-4, -2e-4]), (False, [2e-4, 1e-4, 1e-4, 1e-4])]
)
def test_controller_two_way_sign_flip(two_way, expected):
    repo = REPO(zeta_init=2e-4, two_way=two_way)
    # target 1.0 from it 1 (unchanged); then entropy stays above: /2 to the minimum 1e-4; at the minimum the
    # two-way controller flips to -1e-4, then doubles the negative coefficient; one-way stays at 1e-4.
    zetas = []
    for entropy in (1.0, 1.5, 1.5, 1.5):
        _step(repo, entropy)
        zetas.append(repo.zeta)
    assert zetas == pytest.approx(expected, abs=1e-12)
    assert all((z < 0) == (two_way and i >= 2) for i, z in enumerate(zetas))


def test_state_dict_round_trip():
    repo = REPO(variant="D", two_way=True)
    for entropy in (2.0, 2.5, 2.5):
        _step(repo, entropy)
    state = repo.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    restored = REPO(variant="D", two_way=True)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state
    _step(repo, 1.0)
    _step(restored, 1.0)
    assert restored.state_dict() == repo.state_dict()


def test_repo_and_adapo_own_different_inputs():
    repo, adapo = REPO(zeta_init=0.05), ADAPO(eps_high_init=0.3)
    assert find_regularizers([repo, adapo]) == [repo, adapo]
    view = make_view(R_LOGPROBS, R_ADVANTAGES, mask=R_MASK)
    combined = combine([adapo, repo], view)
    assert torch.allclose(combined.advantages, R_EXPECTED, atol=1e-6)
    assert (combined.eps_low, combined.eps_high) == (0.2, 0.3)


def test_repo_with_another_advantages_owner_is_an_error_naming_both(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"regularizers REPO and OwnsAdvantages both replace 'advantages'"):
        short_fit(tiny_model_dir, tmp_path, [REPO(), OwnsAdvantages()], iterations=1)


# --- fits --------------------------------------------------------------------------------------------


def test_fit_updates_state_once_per_iteration_and_logs(tiny_model_dir, tmp_path):
    repo, adapo, entropies = REPO(variant="D", two_way=True), ADAPO(), EntropyLog()
    trainer, _ = short_fit(
        tiny_model_dir,
        tmp_path,
        [repo, adapo, entropies],
        iterations=2,
        ppo_epochs=2,
        minibatch_size=4,
        microbatch_size=2,  # 4 updates and 8 micro-batches per iteration
    )
    assert len(entropies.entropies) == 2
    # Replaying the controller once per reported entropy gives the callback's state: one update per iteration.
    zeta = 1e-2
    for entropy in entropies.entropies:
        zeta = next_zeta(zeta, entropy, entropies.entropies[0], 1e-3, 10.0, two_way=True)
    assert repo.state_dict() == {"zeta": zeta, "target": entropies.entropies[0], "iterations": 2}
    assert adapo.iterations == 2
    metrics = trainer.logged_metrics
    assert metrics["reg/REPO/zeta"].item() == pytest.approx(zeta)
    assert metrics["reg/REPO/target"].item() == pytest.approx(entropies.entropies[0])
    for key in ("advantage_change", "beta", "entropy_change"):
        assert torch.isfinite(metrics[f"reg/REPO/{key}"])
    assert metrics["reg/REPO/advantage_change"].item() > 0
    assert "reg/ADAPO/eps_high" in metrics


def test_checkpoint_carries_state_and_resumed_fit_continues(tiny_model_dir, tmp_path):
    first = REPO(zeta_init=0.02)
    short_fit(tiny_model_dir, tmp_path / "first", [first], iterations=2, checkpoint=True)
    (path,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    saved = first.state_dict()
    assert saved["iterations"] == 2
    assert torch.load(path, weights_only=False)["callbacks"][first.state_key] == saved

    resumed, watcher, entropies = REPO(zeta_init=0.02), None, EntropyLog()
    watcher = StateAtStart(resumed)
    short_fit(
        tiny_model_dir, tmp_path / "resumed", [resumed, watcher, entropies], iterations=3, ckpt_path=str(path)
    )
    assert watcher.state == saved  # restored before the first resumed iteration
    assert len(entropies.entropies) == 1  # one more iteration
    expected = next_zeta(saved["zeta"], entropies.entropies[0], saved["target"], 1e-4, 0.05)
    # the target is the first fit's initial entropy, not re-measured on resume
    assert resumed.state_dict() == {"zeta": expected, "target": saved["target"], "iterations": 3}


# --- YAML --------------------------------------------------------------------------------------------


def _cli_args(tmp_path, tiny_model_dir, callbacks: list[dict]) -> list[str]:
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "callbacks": callbacks},
        "model": {
            "class_path": "lit_entropy.GRPO",
            "init_args": {
                "policy": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
            },
        },
        "data": {"class_path": "lit_entropy.CountdownDataModule", "init_args": {"batch_size": 2}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]


def test_repo_and_adapo_are_constructible_from_yaml(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's default log folder lands here
    callbacks = [
        {
            "class_path": "lit_entropy.callbacks.repo.REPO",
            "init_args": {"variant": "D", "zeta_init": 0.5, "two_way": True},
        },
        {"class_path": "lit_entropy.callbacks.adapo.ADAPO", "init_args": {"target": 1.5, "relative": False}},
    ]
    cli = LitEntropyCLI(args=_cli_args(tmp_path, tiny_model_dir, callbacks), run=False)
    (repo,) = [c for c in cli.trainer.callbacks if isinstance(c, REPO)]
    (adapo,) = [c for c in cli.trainer.callbacks if isinstance(c, ADAPO)]
    assert (repo.variant, repo.zeta, repo.zeta_min, repo.zeta_max, repo.two_way) == (
        "D",
        0.5,
        1e-3,
        10.0,
        True,
    )
    assert (adapo.target_setting, adapo.relative, adapo.eps_high) == (1.5, False, 0.28)


def test_unknown_variant_in_yaml_is_rejected(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    callbacks = [{"class_path": "lit_entropy.callbacks.repo.REPO", "init_args": {"variant": "X"}}]
    with pytest.raises(SystemExit) as exit_info:
        LitEntropyCLI(args=_cli_args(tmp_path, tiny_model_dir, callbacks), run=False)
    assert exit_info.value.code == 2
    assert "variant" in capsys.readouterr().err
