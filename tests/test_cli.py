"""The `lit-entropy` CLI: every shipped recipe parses, --print_config, one-line errors, and a tiny real fit.

The CLI runs in-process (``main`` / ``LitEntropyCLI``) except where the real exit status of
``python -m lit_entropy`` is the point. Every test runs in its own temporary working directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule

from lit_entropy.cli import LitEntropyCLI, main
from lit_entropy.module import GRPO

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """The CLI's default log folder (``runs``) and any stray ``config.yaml`` land here, never in the repo."""
    monkeypatch.chdir(tmp_path)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(tmp_path: Path, tiny_model_dir: Path, train_files: Path, **trainer) -> Path:
    """A tiny GRPO config over a local jsonl file (2 prompts per iteration, G = 2, 4 new tokens)."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **trainer,
        },
        "model": {
            "class_path": "lit_entropy.GRPO",
            "init_args": {
                "policy": {"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                "rewards": [{"fn": "lit_entropy.rewards.exact_match"}],
                "sampling": {"group_size": 2, "max_new_tokens": 4},
                "learning_rate": 1e-3,
            },
        },
        "data": {
            "class_path": "lit_entropy.PromptDataModule",
            "init_args": {"train_files": str(train_files), "batch_size": 2},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 1), (2, 2), (3, 1), (5, 2)]]
    return _config(tmp_path, tiny_model_dir, _write_jsonl(tmp_path / "train.jsonl", rows))


# --- recipes -----------------------------------------------------------------------------------------


def test_recipes_exist():
    assert RECIPES, f"no YAML recipe under {ROOT / 'recipes'}"


def _recipe_overrides(recipe: dict) -> list[str]:
    """Replacements that let a recipe written for a GPU machine instantiate here (nothing else changes).

    ``policy.path`` stays as written: building the module reads no file, so a recipe for a model folder this
    machine lacks still parses and instantiates.
    """
    overrides = []
    accelerator = (recipe.get("trainer") or {}).get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        overrides += ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    return overrides


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_parses_and_instantiates_without_building_the_model(recipe_path, tiny_model_dir, tmp_path):
    recipe = yaml.safe_load(recipe_path.read_text())
    cli = LitEntropyCLI(args=["--config", str(recipe_path), *_recipe_overrides(recipe)], run=False)
    assert isinstance(cli.model, LightningModule)
    assert type(cli.model).__name__ == recipe["model"]["class_path"].rsplit(".", 1)[-1]
    if isinstance(cli.model, GRPO):
        assert cli.model.policy is None  # construction is cheap: weights load in configure_model
    # Scalars of the recipe reach the module unchanged.
    for key, value in recipe["model"].get("init_args", {}).items():
        if isinstance(value, (int, float, str, bool)) and key in cli.model.hparams:
            assert cli.model.hparams[key] == value, key
    if "max_steps" in recipe.get("trainer", {}):
        assert cli.trainer.max_steps == recipe["trainer"]["max_steps"]
    assert not (tmp_path / "config.yaml").exists()


def test_print_config_shows_the_merged_config(tiny_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            args=[
                "fit",
                "--config",
                str(tiny_config),
                "--model.init_args.sampling.group_size=3",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    init_args = printed["model"]["init_args"]
    assert init_args["sampling"]["group_size"] == 3  # the override
    assert init_args["sampling"]["max_new_tokens"] == 4  # from the file
    assert init_args["loss"] is None and init_args["ppo_epochs"] == 1  # defaults filled in
    assert printed["data"]["class_path"] == "lit_entropy.PromptDataModule"
    assert not (tmp_path / "config.yaml").exists()


# --- errors ------------------------------------------------------------------------------------------


def test_mistyped_key_exits_non_zero_naming_the_key(tiny_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(tiny_config), "--model.init_args.sampling.group_sise", "4"])
    assert exit_info.value.code != 0
    assert "group_sise" in capsys.readouterr().err


def test_mistyped_key_gives_one_clear_error_line(tiny_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(tiny_config), "--model.init_args.sampling.group_sise", "4"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, error_lines
    assert "group_sise" in error_lines[0]


def test_missing_model_folder_is_one_line_with_exit_code_2(tiny_config, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(tiny_config), f"--model.init_args.policy.path={missing}"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert error_lines == [f"lit-entropy: error: policy.path: model folder '{missing}' does not exist"]


def _jsonl_without_prompt(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "questions.jsonl", [{"question": "1+1=", "answer": "2"}] * 4)


def test_dataset_without_prompt_field_names_file_and_field(tmp_path, tiny_model_dir, capsys):
    data = _jsonl_without_prompt(tmp_path)
    config = _config(tmp_path, tiny_model_dir, data)
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == (
        f"lit-entropy: error: {data} row 0: missing field 'prompt' (prompt_field); the rows have columns "
        "['answer', 'question']: set data.init_args.prompt_field: question"
    )
    assert not any("Traceback" in line for line in lines)


def test_module_entry_point_exits_2_with_the_error_on_the_last_line(tmp_path, tiny_model_dir):
    data = _jsonl_without_prompt(tmp_path)
    config = _config(tmp_path, tiny_model_dir, data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "lit_entropy", "fit", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lit-entropy: error: {data} row 0: missing field 'prompt' (prompt_field); the rows have columns "
        "['answer', 'question']: set data.init_args.prompt_field: question"
    )
    assert "Traceback" not in result.stderr


# --- a real fit --------------------------------------------------------------------------------------


def _metric_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open() as file:
        return list(csv.DictReader(file))


def test_fit_writes_metrics_and_config_next_to_the_logs(tiny_config, tmp_path):
    cli = LitEntropyCLI(args=["fit", "--config", str(tiny_config), f"--trainer.default_root_dir={tmp_path}"])
    trainer = cli.trainer
    assert trainer.global_step == 2
    log_dir = Path(trainer.log_dir).resolve()
    assert log_dir.is_relative_to(tmp_path.resolve())
    metrics = Path(trainer.loggers[0].log_dir) / "metrics.csv"
    assert metrics.is_file()
    rows = [row for row in _metric_rows(metrics) if row.get("rollout/reward_mean")]
    assert len(rows) == 2  # one row per RL iteration
    assert all(float(row["train/entropy"]) > 0.0 for row in rows)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["sampling"]["group_size"] == 2
    assert (log_dir / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "config.yaml").exists()  # next to the logs, not in the working directory


def test_fit_outputs_follow_default_root_dir_not_the_working_directory(tiny_config, tmp_path, monkeypatch):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cli = LitEntropyCLI(args=["fit", "--config", str(tiny_config), f"--trainer.default_root_dir={root}"])
    assert cli.trainer.global_step == 2
    assert list(cwd.iterdir()) == []
    assert list(root.rglob("metrics.csv")) and list(root.rglob("config.yaml"))


def test_ckpt_path_last_resumes_the_previous_run_from_another_logger_version(tiny_config, tmp_path):
    root = tmp_path / "root"
    first = LitEntropyCLI(args=["fit", "--config", str(tiny_config), f"--trainer.default_root_dir={root}"])
    assert first.trainer.global_step == 2
    saved = list(root.rglob("last.ckpt"))  # the CLI's default ModelCheckpoint keeps a last.ckpt
    assert len(saved) == 1 and "version_0" in str(saved[0])
    resumed = LitEntropyCLI(
        args=[
            "fit",
            "--config",
            str(tiny_config),
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=3",
            "--ckpt_path=last",
        ]
    )
    # Lightning alone would look in version_1 (empty), warn and start over (ckpt_path None)
    assert resumed.trainer.ckpt_path == str(saved[0])
    assert resumed.trainer.global_step == 3
