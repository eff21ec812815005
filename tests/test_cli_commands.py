"""The command line a TRL / Lightning user expects: checkpointing off, validate / test / predict beside a run (never
inside it), predictions in jsonl, training on from a saved adapter, merge-adapter, the other commands in --help,
and hints for TRL's option names. One short fit of the tiny model (module-scoped) serves most tests."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lit_entropy.cli import LitEntropyCLI, main
from lit_entropy.errors import ConfigError, ModelLoadError
from lit_entropy.merge import merge_adapter
from lit_entropy.model import LoRA, Policy, load_policy
from lit_entropy.run_log import find_metrics_csv, load_run
from lit_entropy.trl_names import trl_hint

PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 1), (2, 2), (3, 1), (5, 2)]]


def _write_config(folder: Path, model_dir: Path) -> Path:
    """A tiny GRPO config: 2 prompts per iteration, G = 2, 4 new tokens, a 2-prompt validation file."""
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    val = folder / "val.jsonl"
    val.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS[:2]))
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
        },
        "model": {
            "class_path": "lit_entropy.GRPO",
            "init_args": {
                "policy": {"path": str(model_dir), "lora": {"r": 4, "alpha": 8}},
                # the second reward varies between completions: the first iteration's update is not zero
                "rewards": [{"fn": "lit_entropy.rewards.exact_match"}, {"fn": "harness.char_code_reward"}],
                "sampling": {"group_size": 2, "max_new_tokens": 4},
                "learning_rate": 1e-2,
            },
        },
        "data": {
            "class_path": "lit_entropy.PromptDataModule",
            "init_args": {"train_files": str(train), "val_files": str(val), "batch_size": 2},
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_dir):
    """``(config, root, log_dir)`` of one finished 1-iteration fit (its adapter in ``log_dir/adapter``)."""
    folder = tmp_path_factory.mktemp("fitted")
    config = _write_config(folder, tiny_model_dir)
    root = folder / "root"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cli = LitEntropyCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={root}"])
    finally:
        os.chdir(cwd)
    assert cli.trainer.global_step == 1
    return config, root, Path(cli.trainer.log_dir)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --- trainer.enable_checkpointing: false -----------------------------------------------------------------


def test_enable_checkpointing_false_runs_without_the_cli_checkpoint(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path, tiny_model_dir)
    root = tmp_path / "root"
    cli = LitEntropyCLI(
        args=[
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_checkpointing=false",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.trainer.checkpoint_callback is None
    assert not list(root.rglob("*.ckpt"))
    assert (Path(cli.trainer.log_dir) / "adapter" / "adapter_config.json").is_file()


def test_enable_checkpointing_false_in_a_recipe(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["enable_checkpointing"] = False
    config.write_text(yaml.safe_dump(data))
    cli = LitEntropyCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'r'}"])
    assert cli.trainer.checkpoint_callback is None


# --- validate / test / predict beside the run ------------------------------------------------------------


def test_validate_with_the_runs_config_writes_under_root_validate_not_into_the_run(fitted, tmp_path):
    _, root, log_dir = fitted
    before = sorted(path.name for path in (root / "lightning_logs").iterdir())
    cli = LitEntropyCLI(
        args=[
            "validate",
            "--config",
            str(log_dir / "config.yaml"),
            f"--trainer.default_root_dir={root}",
            "--trainer.limit_val_batches=1",
        ]
    )
    validate_dir = Path(cli.trainer.log_dir)
    assert validate_dir == root / "validate" / "version_0"
    assert (validate_dir / "metrics.csv").is_file() and (validate_dir / "config.yaml").is_file()
    assert sorted(path.name for path in (root / "lightning_logs").iterdir()) == before  # no version_1
    # the report of the root still reads the training run, not the newer validation log
    assert find_metrics_csv(root) == log_dir / "metrics.csv"
    assert load_run(root).values("train/entropy")


def test_validate_honours_default_root_dir(fitted, tmp_path):
    _, root, log_dir = fitted
    elsewhere = tmp_path / "evals"
    cli = LitEntropyCLI(
        args=[
            "validate",
            "--config",
            str(log_dir / "config.yaml"),
            f"--trainer.default_root_dir={elsewhere}",
            "--trainer.limit_val_batches=1",
        ]
    )
    assert Path(cli.trainer.log_dir) == elsewhere / "validate" / "version_0"
    assert (elsewhere / "validate" / "version_0" / "metrics.csv").is_file()
    assert not (log_dir.parent / "version_1").exists()  # the config names the fit's folder: not used


def test_find_metrics_csv_skips_logs_without_training_metrics(tmp_path):
    train = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    train.parent.mkdir(parents=True)
    train.write_text("epoch,step,train/entropy\n0,0,1.5\n")
    later = tmp_path / "lightning_logs" / "version_1" / "metrics.csv"
    later.parent.mkdir(parents=True)
    later.write_text("epoch,step,val/accuracy\n0,0,0.5\n")
    os.utime(train, (1, 1))
    assert find_metrics_csv(tmp_path) == train


# --- predict -------------------------------------------------------------------------------------------


def test_predict_writes_completions_to_jsonl(fitted, tmp_path):
    _, root, log_dir = fitted
    cli = LitEntropyCLI(
        args=[
            "predict",
            "--config",
            str(log_dir / "config.yaml"),
            f"--trainer.default_root_dir={tmp_path / 'p'}",
            f"--model.init_args.policy.adapter_path={log_dir / 'adapter'}",
        ]
    )
    out = Path(cli.trainer.log_dir) / "predictions.jsonl"
    assert out.parent == tmp_path / "p" / "predict" / "version_0"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in PROMPTS[:2]]  # the validation split
    assert all(set(row) == {"prompt", "completion", "reward", "answer"} for row in rows)
    assert all(isinstance(row["completion"], str) and isinstance(row["reward"], float) for row in rows)
    assert [row["answer"] for row in rows] == ["2", "4"]


# --- policy.adapter_path -------------------------------------------------------------------------------


def test_adapter_path_loads_the_exported_adapter_weights_trainable(fitted, tiny_model_dir):
    _, _, log_dir = fitted
    adapter = log_dir / "adapter"
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    model, _ = load_policy(
        Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8), adapter_path=str(adapter))
    )
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) == len(exported)
    # peft saves without the adapter name ("default"); the exported values are what trains
    for name, parameter in trainable.items():
        key = name.replace(".default", "")
        assert torch.equal(parameter.detach(), exported[key]), name
    fresh, _ = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8)))
    fresh_b = [p for name, p in fresh.named_parameters() if "lora_B" in name]
    # a fresh LoRA starts at zero; the loaded one does not
    assert all(torch.count_nonzero(p) == 0 for p in fresh_b)
    assert any(torch.count_nonzero(p) > 0 for name, p in trainable.items() if "lora_B" in name)


def test_fit_continues_from_an_adapter(fitted, tmp_path):
    config, _, log_dir = fitted
    cli = LitEntropyCLI(
        args=[
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={tmp_path / 'again'}",
            f"--model.init_args.policy.adapter_path={log_dir / 'adapter'}",
        ]
    )
    assert cli.trainer.global_step == 1


def test_adapter_path_missing_folder_is_a_model_load_error(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter folder .* does not exist"):
        Policy(path=str(tiny_model_dir), adapter_path=str(tmp_path / "nope")).check_files()


def test_adapter_path_without_adapter_config_is_a_model_load_error(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no adapter_config.json"):
        Policy(path=str(tiny_model_dir), adapter_path=str(tmp_path / "empty")).check_files()


def test_adapter_path_without_lora_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="policy.adapter_path needs policy.lora"):
        Policy(path=str(tiny_model_dir), lora=None, adapter_path=str(tmp_path)).validate()


def test_adapter_path_warns_on_other_lora_settings_and_another_base(fitted, tiny_model_dir, tmp_path, caplog):
    _, _, log_dir = fitted
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for source in (log_dir / "adapter").iterdir():
        (adapter / source.name).write_bytes(source.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/somewhere/else/OtherModel"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="lit_entropy.adapter"):
        model, _ = load_policy(Policy(path=str(tiny_model_dir), lora=LoRA(r=8), adapter_path=str(adapter)))
    assert "was trained on '/somewhere/else/OtherModel'" in caplog.text
    assert "used instead of policy.lora: r=4 (policy.lora: 8)" in caplog.text
    assert model.peft_config["default"].r == 4  # the adapter's own config wins


# --- merge-adapter -------------------------------------------------------------------------------------


def test_merge_adapter_logits_equal_the_adapter_models(fitted, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, log_dir = fitted
    out = tmp_path / "merged"
    main(["merge-adapter", str(log_dir / "adapter"), "--out", str(out)])
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = load_policy(
        Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8), adapter_path=str(log_dir / "adapter"))
    )
    adapted.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_adapter_refuses_a_non_empty_out(fitted, tmp_path):
    _, _, log_dir = fitted
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ConfigError, match="not an empty folder"):
        merge_adapter(str(log_dir / "adapter"), str(tmp_path / "taken"))


def test_merge_adapter_of_a_folder_without_adapter_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge-adapter", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "ADAPTER_DIR: " in capsys.readouterr().err


# --- --help and TRL's names ----------------------------------------------------------------------------


def test_help_lists_the_other_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("report", "merge-adapter", "prepare-model"):
        assert command in out


@pytest.mark.parametrize(
    ("argument", "hint"),
    [
        ("--model.init_args.beta=0.1", "did you mean model.init_args.loss.kl_coef?"),
        ("--model.init_args.num_generations=4", "did you mean model.init_args.sampling.group_size?"),
        ("--model.init_args.loss.epsilon_high=0.28", "did you mean model.init_args.loss.eps_high?"),
        ("--model.init_args.loss.epsilon=0.2", "did you mean model.init_args.loss.eps_low?"),
        ("--model.init_args.num_iterations=2", "did you mean model.init_args.ppo_epochs?"),
        ("--model.init_args.sampling.max_completion_length=8", "sampling.max_new_tokens?"),
        ("--model.init_args.loss.loss_type=dapo", "dapo ~ token-mean"),
        ("--learning_rate=1e-5", "did you mean model.init_args.learning_rate?"),
        ("--data.init_args.per_device_train_batch_size=8", "did you mean data.init_args.batch_size?"),
        ("--model.init_args.temperature=0.7", "did you mean model.init_args.sampling.temperature?"),
    ],
)
def test_trl_option_on_the_command_line_gets_a_hint(fitted, argument, hint, capsys):
    config, _, _ = fitted
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), argument, "--print_config"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lit-entropy: error: ") and hint in last


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ({"model": {"init_args": {"beta": 0.04}}}, "model.init_args.loss.kl_coef"),
        ({"learning_rate": 1e-5}, "model.init_args.learning_rate"),
        ({"trainer": {"per_device_train_batch_size": 8}}, "data.init_args.batch_size"),
    ],
)
def test_trl_option_in_a_yaml_config_gets_a_hint(fitted, tmp_path, override, hint, capsys):
    config, _, _ = fitted
    extra = tmp_path / "trl.yaml"
    extra.write_text(yaml.safe_dump(override))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--config", str(extra), "--print_config"])
    assert f"did you mean {hint}?" in capsys.readouterr().err


def test_trl_hint_is_empty_for_other_names():
    assert trl_hint("model: Option 'bogus' is not accepted") == ""


def test_all_linear_matches_the_module_names_peft_saved(fitted, tiny_model_dir, caplog):
    _, _, log_dir = fitted
    with caplog.at_level(logging.WARNING, logger="lit_entropy.adapter"):
        load_policy(
            Policy(path=str(tiny_model_dir), lora=LoRA(r=4, alpha=8), adapter_path=str(log_dir / "adapter"))
        )
    assert "own LoRA settings" not in caplog.text  # the fit's "all-linear" is saved as the expanded names
