"""What the console leaves out: Lightning's litlogger tip, the resume's dirpath warning, the embedded warm-up's
own Trainer lines and transformers' bars around its save; everything else stays."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.utilities import rank_zero_info

from lit_entropy.cli import main
from lit_entropy.console import no_transformers_progress_bars, quiet_console, quiet_lightning
from lit_entropy.demo.embedded import EmbeddedModel, prepare_embedded_model
from lit_entropy.model import Policy, load_policy


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 1), (2, 2), (3, 1), (5, 2)]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "num_sanity_val_steps": 0},
        "model": {
            "class_path": "lit_entropy.GRPO",
            "init_args": {
                "policy": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                "sampling": {"group_size": 2, "max_new_tokens": 4},
            },
        },
        "data": {
            "class_path": "lit_entropy.PromptDataModule",
            "init_args": {"train_files": str(train), "batch_size": 2},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _console(capfd, caplog) -> str:
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def test_a_fit_and_its_resume_print_no_litlogger_tip_and_no_dirpath_warning(
    tiny_model_dir, tmp_path, capfd, caplog
):
    caplog.set_level(logging.INFO)
    config = _config(tmp_path, tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
        main(
            args=[
                "fit",
                "--config",
                str(config),
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_steps=4",
                "--ckpt_path=last",
            ]
        )
    console = _console(capfd, caplog)
    assert "Restoring states from the checkpoint" in console  # Lightning's own info lines still come through
    assert "lit_entropy: 2 RL iterations" in console
    assert "litlogger" not in console
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "dirpath has changed" in message]


def test_quiet_console_drops_only_the_tip(caplog):
    quiet_console()
    quiet_console()  # idempotent: one filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len([f for f in logger.filters if type(f).__name__ == "_DropMessages"]) == 1
    caplog.set_level(logging.INFO)
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    rank_zero_info("GPU available: False, used: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_quiet_lightning_silences_info_only_inside_and_restores_the_levels(caplog):
    caplog.set_level(logging.INFO)
    before = logging.getLogger("lightning.pytorch").level
    with quiet_lightning():
        rank_zero_info("inside: info")
        logging.getLogger("lightning.pytorch.trainer").warning("inside: warning")
    rank_zero_info("outside: info")
    assert logging.getLogger("lightning.pytorch").level == before
    assert "inside: info" not in caplog.text
    assert "inside: warning" in caplog.text and "outside: info" in caplog.text


def test_no_transformers_progress_bars_restores_the_switch():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with no_transformers_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_the_embedded_warm_up_prints_no_trainer_lines_and_no_shard_bar(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    prepare_embedded_model(
        EmbeddedModel(hidden_size=32, num_heads=2, warmup_steps=2, cache_dir=str(tmp_path))
    )
    console = _console(capfd, caplog)
    for line in (
        "GPU available",
        "TPU available",
        "`Trainer.fit` stopped",
        "Writing model shards",
        "litlogger",
    ):
        assert line not in console
    assert "supervised warm-up of the embedded model (2 steps)" in caplog.text  # our own line stays


def test_loading_the_embedded_policy_shows_no_weights_bar_and_a_model_folder_still_does(
    tmp_path, tiny_model_dir, capfd
):
    embedded = EmbeddedModel(hidden_size=32, num_heads=2, warmup_steps=2, cache_dir=str(tmp_path))
    prepare_embedded_model(embedded)  # the warm-up, before the load under test
    capfd.readouterr()
    load_policy(Policy(embedded=embedded))
    assert "Loading weights" not in capfd.readouterr().err
    # a real model's load can take minutes: transformers' bar stays
    load_policy(Policy(path=str(tiny_model_dir)))
    assert "Loading weights" in capfd.readouterr().err
