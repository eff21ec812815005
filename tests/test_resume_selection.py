"""Which checkpoint a CLI run resumes, with which settings, into which folder; config files with a key twice.

- ``--ckpt_path last`` resumes the newest readable ``last*.ckpt`` of a run whose saved ``config.yaml`` has this
  run's model, data and callbacks, never another recipe's run in the same root; none matching is an error.
- An unusable ``--ckpt_path FILE`` (missing, a folder, empty, truncated) is one line naming the file.
- ``--model.*`` on the command line wins over the checkpoint's hyperparameters (which win over the config files),
  the optimizer gets a new learning rate, and what a resume cannot change is refused.
- Every run claims its version folder when its Trainer is built, so runs started together never share one.

Fits use the tiny model from ``conftest.py`` (2 prompts per iteration, G = 2, 4 new tokens): seconds each.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lit_entropy.cli import LitEntropyCLI, main
from lit_entropy.config_files import check_config_files
from lit_entropy.errors import ConfigError
from lit_entropy.run_folder import claim_version, find_last_checkpoint, read_checkpoint

ENTROPY_BONUS = [{"class_path": "lit_entropy.callbacks.EntropyBonus", "init_args": {"coef": 0.01}}]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """The CLI's default folder (``runs``) lands in the test's own directory."""
    monkeypatch.chdir(tmp_path)


def _config(
    folder: Path,
    model_dir: Path,
    name: str,
    callbacks: list | None = None,
    data: Path | None = None,
    **init_args: Any,
) -> Path:
    """A tiny GRPO config over a local jsonl file; ``callbacks`` and ``init_args`` make other experiments.

    ``data`` (default ``<folder>/train.jsonl``, written when missing) is part of the configuration: configs that
    must match the fixture's runs read its file.
    """
    data = data or folder / "train.jsonl"
    if not data.exists():
        rows = [
            f'{{"prompt": "{a}+{b}=", "answer": "{a + b}"}}\n' for a, b in [(1, 1), (2, 2), (3, 1), (5, 2)]
        ]
        data.write_text("".join(rows))
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lit_entropy.GRPO",
            "init_args": {
                "policy": {"path": str(model_dir), "lora": {"r": 4, "alpha": 8}},
                "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                "sampling": {"group_size": 2, "max_new_tokens": 4},
                "learning_rate": 1e-3,
                "val_num_samples": 0,
                **init_args,
            },
        },
        "data": {
            "class_path": "lit_entropy.PromptDataModule",
            "init_args": {"train_files": str(data), "batch_size": 2},
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, root: Path, *extra: str) -> LitEntropyCLI:
    return LitEntropyCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *extra])


def _last(root: Path, version: int) -> Path:
    return root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"


def _saved_config(root: Path, version: int) -> dict:
    return yaml.safe_load((root / "lightning_logs" / f"version_{version}" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """A root holding a plain GRPO run (version_0) and, newer, an entropy-bonus run (version_1), 2 steps each.

    Tests copy it (`_copy`): resuming writes new runs into the root.
    """
    folder = tmp_path_factory.mktemp("two_runs")
    root = folder / "runs"
    grpo = _config(folder, tiny_model_dir, "grpo")
    bonus = _config(folder, tiny_model_dir, "entropy_bonus", callbacks=ENTROPY_BONUS)
    assert _fit(grpo, root).trainer.global_step == 2
    assert _fit(bonus, root).trainer.global_step == 2
    assert _last(root, 0).is_file() and _last(root, 1).is_file()
    assert _last(root, 1).stat().st_mtime >= _last(root, 0).stat().st_mtime
    return folder


def _copy(two_runs: Path, tmp_path: Path) -> Path:
    """The two runs in this test's folder (``copytree`` keeps modification times, which order the checkpoints)."""
    shutil.copytree(two_runs / "runs", tmp_path / "runs")
    return tmp_path / "runs"


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lit-entropy: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# --- --ckpt_path last --------------------------------------------------------------------------------


def test_last_resumes_the_run_of_this_configuration_not_the_newest_in_the_root(
    two_runs, tmp_path, tiny_model_dir
):
    root = _copy(two_runs, tmp_path)
    grpo = _config(tmp_path, tiny_model_dir, "grpo", data=two_runs / "train.jsonl")
    resumed = _fit(grpo, root, "--trainer.max_steps=3", "--ckpt_path=last")
    # the entropy-bonus run's last.ckpt is newer, but it is another experiment
    assert resumed.trainer.ckpt_path == str(_last(root, 0))
    assert resumed.trainer.global_step == 3
    assert _saved_config(root, 2)["trainer"]["callbacks"] is None


def test_last_without_a_matching_run_names_this_configuration_and_the_candidates(
    two_runs, tmp_path, tiny_model_dir, capsys
):
    root = _copy(two_runs, tmp_path)
    coef = [{**ENTROPY_BONUS[0], "init_args": {"coef": 0.1}}]
    other = _config(tmp_path, tiny_model_dir, "bonus_0.1", callbacks=coef, data=two_runs / "train.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(other), f"--trainer.default_root_dir={root}", "--ckpt_path=last"])
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert line.startswith(
        f"lit-entropy: error: --ckpt_path last: no last*.ckpt under {root} belongs to a run of "
    )
    assert (
        f"this configuration (--config {other}; model lit_entropy.GRPO, data lit_entropy.PromptDataModule"
        in line
    )
    assert f"{_last(root, 1)} (trainer.callbacks[0].init_args.coef is 0.01 there, 0.1 here)" in line
    assert f"{_last(root, 0)} (trainer.callbacks is none there, [EntropyBonus] here)" in line
    assert "pass it as --ckpt_path PATH" in line
    assert not (root / "lightning_logs" / "version_2").exists()  # refused before any folder was claimed


def test_last_with_a_changed_model_setting_is_another_configuration(
    two_runs, tmp_path, tiny_model_dir, capsys
):
    root = _copy(two_runs, tmp_path)
    grpo = _config(tmp_path, tiny_model_dir, "grpo", data=two_runs / "train.jsonl")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(grpo), f"--trainer.default_root_dir={root}", "--ckpt_path=last",
              "--model.init_args.learning_rate=1e-4"])  # fmt: skip
    assert f"{_last(root, 0)} (model.init_args.learning_rate is 0.001 there, 0.0001 here)" in _error_line(
        capsys
    )


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "folder"])
def test_last_skips_an_unreadable_newest_checkpoint_with_a_warning(two_runs, tmp_path, damage, capsys):
    root = _copy(two_runs, tmp_path)
    newest = root / "lightning_logs" / "version_7"
    shutil.copytree(root / "lightning_logs" / "version_0", newest)  # the same configuration, newer
    broken = _last(root, 7)
    if damage == "truncated":
        broken.write_bytes(broken.read_bytes()[:4096])
    elif damage == "zero-bytes":
        broken.write_bytes(b"")
    else:
        broken.unlink()
        broken.mkdir()
    config = _saved_config(root, 0)
    assert find_last_checkpoint(root, config) == str(_last(root, 0))
    err = capsys.readouterr().err
    assert f"lit-entropy: warning: skipping unreadable checkpoint {broken}: " in err
    assert f"lit-entropy: resuming from {_last(root, 0)}" in err


def test_last_when_every_matching_checkpoint_is_unreadable_is_an_error(two_runs, tmp_path):
    root = _copy(two_runs, tmp_path)
    _last(root, 0).write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"every last\*\.ckpt of .* is unreadable: .*version_0/checkpoints/last"
    ):
        find_last_checkpoint(root, _saved_config(root, 0))


def test_last_with_no_checkpoint_at_all_starts_from_scratch(tmp_path):
    assert find_last_checkpoint(tmp_path / "runs", {"model": {}}) == "last"


# --- an explicit --ckpt_path -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "truncated"])
def test_an_unusable_explicit_checkpoint_is_one_line_naming_the_file(
    two_runs, tmp_path, tiny_model_dir, case, capsys
):
    grpo = _config(tmp_path, tiny_model_dir, "grpo")
    path = tmp_path / f"{case}.ckpt"
    expected = {
        "missing": "file does not exist",
        "folder": "is a folder, not a checkpoint file (nor a sharded checkpoint folder with meta.pt)",
        "empty": "file is empty (0 bytes)",
        "truncated": "cannot be read as a checkpoint (4096 bytes; truncated or not a checkpoint?): the zip archive "
        "ends before its central directory: the file was cut short",
    }[case]
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(_last(two_runs / "runs", 0).read_bytes()[:4096])
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(grpo),
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
                f"--ckpt_path={path}",
            ]
        )
    assert exit_info.value.code == 2
    assert _error_line(capsys) == f"lit-entropy: error: --ckpt_path {path}: {expected}"


def test_a_sharded_checkpoint_folder_is_read_through_its_meta_file(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"hyper_parameters": {"learning_rate": 0.5}, "global_step": 4}, folder / "meta.pt")
    assert read_checkpoint(folder) == {"learning_rate": 0.5}


def test_command_line_model_overrides_win_over_the_checkpoint(two_runs, tmp_path, tiny_model_dir, capsys):
    root = _copy(two_runs, tmp_path)
    # the file's max_grad_norm differs from the checkpoint's (1.0): as in Lightning, the checkpoint's wins
    grpo = _config(tmp_path, tiny_model_dir, "grpo", data=two_runs / "train.jsonl", max_grad_norm=0.5)
    resumed = _fit(grpo, root, "--trainer.max_steps=3", f"--ckpt_path={_last(root, 0)}",
                   "--model.init_args.learning_rate", "1e-5")  # fmt: skip
    assert resumed.trainer.global_step == 3
    assert resumed.model.learning_rate == 1e-5
    assert resumed.model.max_grad_norm == 1.0
    # Lightning restores the optimizer's param_groups (lr 1e-3) after configure_optimizers: the new rate is put back
    assert [group["lr"] for group in resumed.trainer.optimizers[0].param_groups] == [1e-5]
    saved = _saved_config(root, 2)["model"]["init_args"]
    assert saved["learning_rate"] == 1e-5 and saved["max_grad_norm"] == 1.0
    err = capsys.readouterr().err
    assert (
        "lit-entropy: the command line's values replace the checkpoint's: "
        "model.init_args.learning_rate=1e-05 (checkpoint: 0.001)"
    ) in err
    assert (
        "the checkpoint's values replace the config's: model.init_args.max_grad_norm=1.0 (config: 0.5)" in err
    )


def test_overrides_a_resume_cannot_change_are_refused_by_name(two_runs, tmp_path, tiny_model_dir, capsys):
    grpo = _config(tmp_path, tiny_model_dir, "grpo")
    ckpt = _last(two_runs / "runs", 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(grpo), f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--ckpt_path={ckpt}",
              "--model.init_args.policy.lora.r=8"])  # fmt: skip
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert line.startswith(
        f"lit-entropy: error: --ckpt_path {ckpt}: a resume cannot change model.init_args.policy.lora.r "
        "(4 in the checkpoint, 8 here: the checkpoint's LoRA weights have the shapes and places of the old setting)"
    )


def test_a_new_learning_rate_with_an_lr_scheduler_is_refused(two_runs, tmp_path, tiny_model_dir, capsys):
    scheduler = {"class_path": "torch.optim.lr_scheduler.ConstantLR", "init_args": {"factor": 1.0}}
    grpo = _config(tmp_path, tiny_model_dir, "grpo", lr_scheduler=scheduler)
    ckpt = _last(two_runs / "runs", 0)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(grpo), f"--ckpt_path={ckpt}", "--model.init_args.learning_rate=1e-5"])
    assert (
        "model.init_args.learning_rate (0.001 in the checkpoint, 1e-05 here: the lr_scheduler"
        in _error_line(capsys)
    )


# --- run folders -------------------------------------------------------------------------------------


def test_two_runs_started_together_get_their_own_version_folders(tmp_path, tiny_model_dir):
    """Both Trainers exist before either writes: Lightning's loggers alone would both pick version_0."""
    grpo = _config(tmp_path, tiny_model_dir, "grpo")
    root = tmp_path / "runs"
    first = LitEntropyCLI(args=["--config", str(grpo), f"--trainer.default_root_dir={root}"], run=False)
    second = LitEntropyCLI(args=["--config", str(grpo), f"--trainer.default_root_dir={root}"], run=False)
    versions = [[logger.version for logger in cli.trainer.loggers] for cli in (first, second)]
    assert versions == [[0, 0], [1, 1]]  # CSV and TensorBoard agree within a run
    assert (root / "lightning_logs" / "version_0").is_dir() and (root / "tensorboard" / "version_1").is_dir()
    assert first.trainer.log_dir != second.trainer.log_dir
    # the number is not written into the config: its config.yaml can start another run without clashing
    assert first.config.trainer.logger[0].init_args.version is None


def test_an_explicit_logger_version_is_left_alone(tmp_path, tiny_model_dir):
    grpo = _config(tmp_path, tiny_model_dir, "grpo")
    cli = LitEntropyCLI(
        args=[
            "--config",
            str(grpo),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir=runs",
            "--trainer.logger.version=mine",
        ],  # fmt: skip
        run=False,
    )
    assert cli.trainer.logger.version == "mine"
    assert not (tmp_path / "runs" / "lightning_logs").exists()


def test_threads_racing_for_a_version_each_get_their_own_folder(tmp_path):
    roots = [tmp_path / "lightning_logs", tmp_path / "tensorboard"]
    (roots[1] / "version_2").mkdir(parents=True)  # taken in one root only: every claim starts above it
    threads_count = 8
    barrier = threading.Barrier(threads_count)
    claimed: list[int] = []

    def claim() -> None:
        barrier.wait()
        claimed.append(claim_version(roots))

    threads = [threading.Thread(target=claim) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(3, 3 + threads_count))
    for root in roots:
        assert {path.name for path in root.iterdir()} >= {f"version_{n}" for n in claimed}
    assert not (roots[0] / "version_2").exists()  # never left behind when the other root had it


# --- config files ------------------------------------------------------------------------------------


def test_a_duplicate_key_in_a_config_file_is_one_line_naming_file_key_and_line(tmp_path, capsys):
    bad = tmp_path / "dup.yaml"
    bad.write_text(
        "trainer:\n  max_steps: 2\nmodel:\n  class_path: lit_entropy.GRPO\n  init_args:\n"
        "    learning_rate: 0.001\n    ppo_epochs: 1\n    learning_rate: 1.0e-05\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert _error_line(capsys) == (
        f"lit-entropy: error: --config {bad}: duplicate key 'model.init_args.learning_rate' at line 8 "
        "(first at line 6); YAML would keep only the last value: remove one"
    )


def test_merge_keys_and_equal_keys_in_different_mappings_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "base: &base\n  lr: 1\n  seed: 0\nmodel:\n  <<: *base\n  lr: 2\ndata:\n  seed: 0\n  items:\n  - {a: 1}\n  - {a: 2}\n"
    )
    check_config_files(["fit", "--config", str(path)])
    path.write_text("data:\n  items:\n  - a: 1\n    a: 2\n")
    with pytest.raises(
        ConfigError, match=r"duplicate key 'data\.items\[0\]\.a' at line 4 \(first at line 3\)"
    ):
        check_config_files(["fit", "--config", str(path)])


def test_a_checkpoint_of_another_lora_rank_is_refused_naming_the_weight_and_both_shapes(
    tiny_model_dir, tmp_path
):
    from harness import short_fit

    from lit_entropy.model import LoRA, Policy

    short_fit(tiny_model_dir, tmp_path / "r4", [], iterations=1, checkpoint=True)
    (saved,) = (tmp_path / "r4" / "checkpoints").glob("*.ckpt")
    rank_8 = Policy(path=str(tiny_model_dir), lora=LoRA(r=8, alpha=16))
    with pytest.raises(
        ConfigError, match=r"checkpoint weight \S+lora_A\S+ has shape \[4, \d+\], this model's has \[8, \d+\]"
    ):
        short_fit(tiny_model_dir, tmp_path / "r8", [], iterations=2, ckpt_path=str(saved), policy=rank_8)
