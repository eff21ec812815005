"""The runs of ``benchmarks/evidence.py``: which runs a comparison holds, and that a finished run is only reused
for the command that made it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest


def compared(evidence, tmp_path: Path, all_variants: bool, chosen: dict[str, int], names=("GRPO", "KLCov")):
    args = argparse.Namespace(
        model="smollm2", seeds=[0, 1], methods=list(names), all_variants=all_variants, iterations=8
    )
    setting = evidence.setting("smollm2", iterations=8, val_every=2, samples=0)
    return evidence.compared_runs(args, setting, tmp_path, chosen)


def callbacks_of(run) -> list[dict]:
    command = run.command
    return (
        json.loads(command[command.index("--trainer.callbacks") + 1])
        if "--trainer.callbacks" in command
        else []
    )


def test_compare_holds_the_kept_variant_and_with_all_variants_every_one(evidence, tmp_path):
    kept_only = compared(evidence, tmp_path, all_variants=False, chosen={"KLCov": 1})
    assert [(run.label, run.seed) for run in kept_only] == [
        ("GRPO", 0),
        ("KLCov", 0),
        ("GRPO", 1),
        ("KLCov", 1),
    ]
    klcov = kept_only[1]
    assert klcov.folder == tmp_path / "compare" / "KLCov" / "seed0"
    assert callbacks_of(klcov)[0]["init_args"]["kl_coef"] == 4.0  # variant 1 of the grid (1.0, 4.0)

    every = compared(evidence, tmp_path, all_variants=True, chosen={"KLCov": 1})
    by_label = {(run.label, run.seed): run for run in every}
    assert sorted(by_label) == sorted(
        [(label, seed) for label in ("GRPO", "KLCov", "KLCov kl_coef=1.0") for seed in (0, 1)]
    )
    other = by_label[("KLCov kl_coef=1.0", 1)]
    assert other.folder == tmp_path / "compare" / "KLCov-kl_coef=1.0" / "seed1"
    assert callbacks_of(other)[0]["init_args"]["kl_coef"] == 1.0
    assert (
        "--seed_everything" in other.command
        and other.command[other.command.index("--seed_everything") + 1] == "1"
    )
    # the kept variant keeps its folder, so runs made before --all-variants are found again
    assert by_label[("KLCov", 0)].folder == klcov.folder
    assert callbacks_of(by_label[("KLCov", 0)]) == callbacks_of(klcov)
    # a variant's transfer run sits under its compare folder's name and starts from its adapter
    args = argparse.Namespace(transfer_iterations=6)
    setting = evidence.setting("smollm2", iterations=8, val_every=2, samples=0)
    transferred = {run.folder: run for run in evidence.transfer_runs(args, setting, tmp_path, [other])}
    run = transferred[tmp_path / "transfer" / "KLCov-kl_coef=1.0" / "seed1"]
    assert run.command[run.command.index("--model.init_args.policy.adapter_path") + 1] == str(
        other.folder / "adapter"
    )


def test_methods_name_a_single_variant_and_default_to_every_kept_one(evidence, tmp_path):
    one = compared(
        evidence, tmp_path, all_variants=False, chosen={"KLCov": 0}, names=("GRPO", "KLCov kl_coef=4.0")
    )
    assert [(run.label, run.seed) for run in one] == [
        ("GRPO", 0),
        ("KLCov kl_coef=4.0", 0),
        ("GRPO", 1),
        ("KLCov kl_coef=4.0", 1),
    ]
    assert callbacks_of(one[1])[0]["init_args"]["kl_coef"] == 4.0

    everything = compared(evidence, tmp_path, all_variants=False, chosen={"KLCov": 1}, names=())
    labels = [run.label for run in everything if run.seed == 0]
    assert labels == [method.label for method in evidence.methods("smollm2")]  # one kept variant per method
    klcov = next(run for run in everything if run.label == "KLCov")
    assert callbacks_of(klcov)[0]["init_args"]["kl_coef"] == 4.0


def test_a_finished_run_of_another_command_is_an_error_not_a_result(evidence, tmp_path):
    folder = tmp_path / "compare" / "KLCov" / "seed0"
    asked = evidence.Run(
        "KLCov", "kl_coef=1.0", 0, folder, [sys.executable, "-c", "pass", "fit", "kl_coef=1.0"]
    )
    evidence.execute(asked, threads=1)  # a command that exits 0 and exports nothing: started, not finished
    assert json.loads((folder / evidence.COMMAND_FILE).read_text()) == asked.command[1:]
    assert not asked.finished()

    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    assert asked.finished()
    # the same arguments under another interpreter's path are the same run
    assert evidence.Run(
        "KLCov", "kl_coef=1.0", 0, folder, ["/elsewhere/python", *asked.command[1:]]
    ).finished()

    changed = evidence.Run(
        "KLCov", "kl_coef=4.0", 0, folder, [sys.executable, "-c", "pass", "fit", "kl_coef=4.0"]
    )
    with pytest.raises(SystemExit, match="different command") as error:
        changed.finished()
    assert str(folder) in str(error.value) and "kl_coef=4.0" in str(error.value)


def test_a_finished_run_without_a_recorded_command_is_reused(evidence, tmp_path):
    folder = tmp_path / "run"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    assert evidence.Run("GRPO", "-", 0, folder, [sys.executable, "-m", "lit_entropy", "fit"]).finished()


def test_a_run_title_names_the_knob_once(evidence, tmp_path):
    assert (
        evidence.Run("KLCov kl_coef=4.0", "kl_coef=4.0", 1, tmp_path, []).title()
        == "KLCov kl_coef=4.0 seed 1"
    )
    assert evidence.Run("KLCov", "kl_coef=1.0", 2, tmp_path, []).title() == "KLCov kl_coef=1.0 seed 2"
    assert evidence.Run("GRPO", "-", 0, tmp_path, []).title() == "GRPO seed 0"


def test_a_switch_on_a_method_is_compared_at_that_methods_kept_target_and_not_tuned(evidence, tmp_path):
    names = ("EntropyConstraint", "EntropyConstraint-two-sided", "EntropyConstraint-PI")
    for kept in (0, 1):
        runs = compared(
            evidence, tmp_path, all_variants=False, chosen={"EntropyConstraint": kept}, names=names
        )
        one_sided, two_sided, pi = (callbacks_of(run)[0]["init_args"] for run in runs[:3])
        assert [run.label for run in runs[:3]] == list(names)
        assert two_sided == {**one_sided, "two_sided": True}  # the same target, the switch on
        assert pi == {**two_sided, "lr_lambda": 0.25, "lambda_kp": 1.0}  # and the gains replaced
        assert runs[1].folder == tmp_path / "compare" / "EntropyConstraint-two-sided" / "seed0"
    args = argparse.Namespace(model="smollm2", methods=list(names), tune_seed=100, iterations=8)
    setting = evidence.setting("smollm2", iterations=8, val_every=2, samples=0)
    assert sorted(evidence.tuning_runs(args, setting, tmp_path)) == ["EntropyConstraint", "GRPO"]


def test_a_compared_run_on_the_tuning_seed_is_validated_as_a_tuning_seed_row(evidence, tmp_path):
    def run(label: str, knob: str, seed: int, name: str, finished: bool = True):
        folder = tmp_path / name
        if finished:
            (folder / "adapter").mkdir(parents=True)
            (folder / "adapter" / "adapter_config.json").write_text("{}")
        return evidence.Run(label, knob, seed, folder, [sys.executable, "-m", "lit_entropy", "fit"])

    compared = [
        run("EntropyConstraint", "target=0.66->0.41", 0, "a"),
        run("EntropyConstraint target=0.74->0.57", "target=0.74->0.57", 100, "b"),
        run("EntropyConstraint", "target=0.66->0.41", 1, "c", finished=False),
    ]
    tuned = {"GRPO": [run("GRPO", "-", 100, "d")], "ClipCov": [run("ClipCov", "ratio=0.1", 100, "e")]}
    args = argparse.Namespace(tune_seed=100)
    labels = [run.label for run in evidence.validated_runs(args, tuned, compared)]
    tuning = evidence.TUNING_SEED
    assert labels == [
        "EntropyConstraint",
        f"EntropyConstraint target=0.74->0.57 {tuning}",  # set against GRPO on seed 100, not on seeds 0-2
        f"GRPO {tuning}",
        f"ClipCov ratio=0.1 {tuning}",
    ]
