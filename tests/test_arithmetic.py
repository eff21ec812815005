"""Arithmetic: the deterministic question generator and its data module (held-out validation questions)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from lit_entropy import ArithmeticDataModule
from lit_entropy.arithmetic import apply_operation, generate_arithmetic_examples
from lit_entropy.errors import ConfigError
from lit_entropy.rewards import last_number_match

ROOT = Path(__file__).resolve().parents[1]


def test_apply_operation_by_hand() -> None:
    assert apply_operation(17, "+", 8) == 25
    assert apply_operation(3, "-", 10) == -7
    assert apply_operation(6, "*", 7) == 42
    with pytest.raises(ConfigError, match="operation"):
        apply_operation(6, "/", 3)  # type: ignore[arg-type]


def test_rows_are_deterministic_and_their_answers_correct() -> None:
    state = random.getstate()
    rows = generate_arithmetic_examples(
        200, seed=3, operations=["+", "-", "*"], min_operand=1, max_operand=30
    )
    assert random.getstate() == state  # the global RNG is untouched
    assert rows == generate_arithmetic_examples(200, 3, ["+", "-", "*"], 1, 30)
    assert rows != generate_arithmetic_examples(200, 4, ["+", "-", "*"], 1, 30)
    assert {row["op"] for row in rows} == {"+", "-", "*"}
    for row in rows:
        assert 1 <= row["a"] <= 30 and 1 <= row["b"] <= 30
        assert row["prompt"] == f"What is {row['a']} {row['op']} {row['b']}? Answer with a number."
        assert row["answer"] == eval(f"{row['a']} {row['op']} {row['b']}")  # noqa: S307 - our own digits
        assert row["answer"] >= 0  # subtractions are asked larger-first without allow_negative
        # The reward accepts the answer written the way a chat model writes it.
        assert last_number_match(f"{row['a']} {row['op']} {row['b']} = {row['answer']}.", row) == 1.0


def test_allow_negative_keeps_the_drawn_order_and_a_custom_template() -> None:
    rows = generate_arithmetic_examples(
        300,
        seed=0,
        operations=["-"],
        min_operand=1,
        max_operand=9,
        allow_negative=True,
        template="{a}{op}{b}=",
    )
    assert any(row["answer"] < 0 for row in rows)
    assert all(row["prompt"] == f"{row['a']}-{row['b']}=" for row in rows)


def test_exclude_is_never_generated() -> None:
    # "+" on [1, 3] has 9 questions; excluding 8 leaves exactly one.
    everything = {f"What is {a} + {b}? Answer with a number." for a in range(1, 4) for b in range(1, 4)}
    left = "What is 2 + 3? Answer with a number."
    rows = generate_arithmetic_examples(20, seed=0, min_operand=1, max_operand=3, exclude=everything - {left})
    assert {row["prompt"] for row in rows} == {left}
    with pytest.raises(ConfigError, match="excluded"):
        generate_arithmetic_examples(1, seed=0, min_operand=1, max_operand=3, exclude=everything)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"operations": ["/"]}, "operations"),
        ({"operations": []}, "operations"),
        ({"operations": "+"}, "operations"),  # a string, not a list
        ({"min_operand": 5, "max_operand": 4}, "min_operand"),
        ({"template": "What is {x}?"}, "template"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        generate_arithmetic_examples(1, seed=0, **kwargs)


def test_data_module_holds_validation_questions_out_of_training() -> None:
    # "+" on [1, 20]: 400 questions, so 4096 training rows would cover all of them if nothing were held out.
    data = ArithmeticDataModule(num_train=4096, num_val=64, batch_size=8, seed=0)
    data.setup("fit")
    val = [row["prompt"] for row in data.val_rows]
    assert len(val) == len(set(val))  # no repeats
    assert 50 <= len(val) <= 64  # 64 draws from 400 questions repeat a few
    assert not set(val) & {row["prompt"] for row in data.train_rows}
    assert len(data.train_rows) == 4096
    assert len(data.val_sources) == len(val)
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 8 and all(set(row) == {"prompt", "answer", "a", "op", "b"} for row in batch)
    with pytest.raises(ConfigError, match="no test split"):
        data.test_dataloader()


def test_data_module_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="num_train"):
        ArithmeticDataModule(num_train=0)
    with pytest.raises(ConfigError, match="operations"):
        ArithmeticDataModule(operations=["%"])  # type: ignore[list-item]


def test_the_cpu_recipe_trains_on_this_task_with_this_reward() -> None:
    # tests/test_cli.py instantiates every recipe; this checks what the real-model recipe is made of and that
    # its header tells how it is run (the measured figures are in docs/real_model.md).
    path = ROOT / "recipes" / "cpu" / "smollm2-arithmetic.yaml"
    text = path.read_text()
    recipe = yaml.safe_load(text)
    header = text.split("\nseed_everything", 1)[0]
    assert "lit-entropy fit --config recipes/cpu/smollm2-arithmetic.yaml" in header
    init = recipe["model"]["init_args"]
    assert init["policy"]["path"] == ".cache/models/SmolLM2-135M-Instruct"
    assert init["policy"]["lora"]["target_modules"] == "all-linear"
    assert [reward["fn"] for reward in init["rewards"]] == ["lit_entropy.rewards.last_number_match"]
    assert recipe["data"]["class_path"] == "lit_entropy.ArithmeticDataModule"
    # One on-policy update per RL iteration: the mini-batch is the whole rollout of B*G sequences.
    rollout = recipe["data"]["init_args"]["batch_size"] * init["sampling"]["group_size"]
    assert init["minibatch_size"] == rollout
    assert (
        recipe["trainer"]["max_steps"] % recipe["trainer"]["val_check_interval"] == 0
    )  # validates at the end
