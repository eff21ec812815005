"""PromptDataModule / CountdownDataModule on files written here, and render_prompt with a tiny tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_entropy.data import PromptDataModule
from lit_entropy.demo import CountdownDataModule, generate_countdown_examples
from lit_entropy.errors import ConfigError, DataError
from lit_entropy.prompt_files import load_prompt_rows
from lit_entropy.prompts import render_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"question": f"q{i}", "solution": f"#### {i}", "id": i} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _prompt_file(tmp_path: Path, n: int, name: str = "train.jsonl") -> str:
    return _write_jsonl(tmp_path / name, [{"prompt": f"p{i}", "answer": i} for i in range(n)])


# ---------------------------------------------------------------------------------------------- loading


def test_jsonl_json_parquet_and_csv_load_the_same_rows(tmp_path: Path) -> None:
    rows = _rows(5)
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    expected = [{**row, "prompt": row["question"], "answer": row["solution"]} for row in rows]
    for path in [jsonl, str(tmp_path / "a.json"), str(tmp_path / "a.parquet"), str(tmp_path / "a.csv")]:
        loaded = load_prompt_rows(path, prompt_field="question", answer_field="solution")
        assert loaded == expected, path
        assert all(type(row) is dict for row in loaded)


def test_default_fields_no_answer_field_and_several_files(tmp_path: Path) -> None:
    first = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "answer": 0}])  # 0 is a valid answer
    second = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "y", "answer": 1, "extra": "e"}])
    rows = load_prompt_rows([first, second])
    assert rows == [{"prompt": "x", "answer": 0}, {"prompt": "y", "answer": 1, "extra": "e"}]
    no_answer = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "z"}])
    assert load_prompt_rows(no_answer, answer_field=None) == [{"prompt": "z"}]
    # Glob patterns expand in sorted order.
    assert [row["prompt"] for row in load_prompt_rows(str(tmp_path / "[ab].jsonl"))] == ["x", "y"]


def test_chat_message_prompts_are_kept_as_lists(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "answer": "1"}])
    assert load_prompt_rows(path, prompt_field="messages")[0]["prompt"] == messages


@pytest.mark.parametrize(
    ("bad_row", "field", "argument", "what"),
    [
        ({"solution": "#### 3"}, "question", "prompt_field", "missing"),
        ({"question": None, "solution": "#### 3"}, "question", "prompt_field", "missing"),
        ({"question": "  ", "solution": "#### 3"}, "question", "prompt_field", "empty"),
        ({"question": "q"}, "solution", "answer_field", "missing"),
        ({"question": "q", "solution": ""}, "solution", "answer_field", "empty"),
    ],
)
def test_bad_row_names_file_row_and_field(
    tmp_path: Path, bad_row: dict[str, Any], field: str, argument: str, what: str
) -> None:
    rows = _rows(3) + [bad_row] + _rows(2)  # the bad row has index 3 (counted from 0)
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    dm = PromptDataModule(train_files=path, prompt_field="question", answer_field="solution", batch_size=1)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert str(info.value) == f"{path} row 3: {what} field {field!r} ({argument})"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_prompt_rows(missing)
    text = tmp_path / "train.txt"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"train\.txt: unsupported extension '\.txt'"):
        load_prompt_rows(str(text))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_prompt_rows(str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="header.csv: file has no rows"):
        load_prompt_rows(str(header_only))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": 1}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl: cannot be read as json") as info:
        load_prompt_rows(str(broken))
    assert info.value.__cause__ is not None  # the datasets exception is chained, not swallowed
    with pytest.raises(DataError, match="no file matches"):
        load_prompt_rows(str(tmp_path / "*.parquet"))


def test_setup_errors_for_missing_validation_file_and_unset_train_files(tmp_path: Path) -> None:
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 4), val_files=str(tmp_path / "val.jsonl"))
    with pytest.raises(DataError, match="val.jsonl: file not found"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="train_files"):
        PromptDataModule().setup("fit")


# ------------------------------------------------------------------------------------------ constructor


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_batch_size": 0}, "val_batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"max_val_examples": -1}, "max_val_examples"),
        ({"num_workers": -1}, "num_workers"),
        ({"prompt_field": ""}, "prompt_field"),
    ],
)
def test_constructor_validates_numbers(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        PromptDataModule(train_files="train.jsonl", **kwargs)


def test_constructor_reads_no_files(tmp_path: Path) -> None:
    dm = PromptDataModule(train_files=str(tmp_path / "does_not_exist.jsonl"))
    assert dm.train_rows is None  # only setup touches the file system


# ----------------------------------------------------------------------------------------------- splits


def test_val_fraction_split_sizes_disjoint_and_deterministic(tmp_path: Path) -> None:
    path = _prompt_file(tmp_path, 10)

    def split(seed: int) -> tuple[list[str], list[str]]:
        dm = PromptDataModule(train_files=path, val_fraction=0.3, seed=seed, batch_size=2)
        dm.setup("fit")
        assert dm.train_rows is not None and dm.val_rows is not None
        return [r["prompt"] for r in dm.train_rows], [r["prompt"] for r in dm.val_rows]

    train, val = split(seed=0)
    assert (len(train), len(val)) == (7, 3)  # floor(10 * 0.3) = 3 held out
    assert sorted(train + val) == sorted(f"p{i}" for i in range(10))
    assert split(seed=0) == (train, val)
    assert any(split(seed=s)[1] != val for s in range(1, 5))  # the seed chooses the held-out rows
    # Both parts keep file order.
    assert train == sorted(train, key=lambda p: int(p[1:])) and val == sorted(val, key=lambda p: int(p[1:]))


def test_val_fraction_small_datasets_and_max_val_examples(tmp_path: Path) -> None:
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 5), val_fraction=0.1, batch_size=1)
    dm.setup("fit")
    assert (len(dm.train_rows or []), len(dm.val_rows or [])) == (4, 1)  # at least one row when > 0
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 20), val_fraction=0.5, max_val_examples=3)
    dm.setup("validate")  # the validation stage alone still splits the training file
    assert len(dm.val_rows or []) == 3 and len(dm.train_rows or []) == 10
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 1), val_fraction=0.5)
    with pytest.raises(DataError, match="leaves no training rows"):
        dm.setup("fit")


def test_val_files_take_precedence_over_val_fraction(tmp_path: Path) -> None:
    val = _write_jsonl(tmp_path / "val.jsonl", [{"prompt": "v0", "answer": 0}, {"prompt": "v1", "answer": 1}])
    with pytest.warns(UserWarning, match="val_fraction"):
        dm = PromptDataModule(train_files=_prompt_file(tmp_path, 6), val_files=val, val_fraction=0.5)
    dm.setup("fit")
    assert len(dm.train_rows or []) == 6
    assert [r["prompt"] for r in dm.val_rows or []] == ["v0", "v1"]


def test_setup_loads_only_what_the_stage_needs(tmp_path: Path) -> None:
    train = _prompt_file(tmp_path, 4)
    test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "t", "answer": 1}])
    dm = PromptDataModule(train_files=train, test_files=test, batch_size=2)
    dm.setup("test")
    assert dm.train_rows is None and dm.test_rows == [{"prompt": "t", "answer": 1}]
    dm.setup("fit")
    assert len(dm.train_rows or []) == 4
    rows_before = dm.train_rows
    dm.setup("fit")  # Lightning may call setup again: no reload
    assert dm.train_rows is rows_before


# ---------------------------------------------------------------------------------------------- loaders


def test_train_batches_are_lists_of_exactly_b_dicts(tmp_path: Path) -> None:
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 10), batch_size=4, seed=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 10 // 4, the incomplete batch of 2 is dropped
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 4
        assert all(isinstance(row, dict) and set(row) == {"prompt", "answer"} for row in batch)
        assert all(row["prompt"] == f"p{row['answer']}" for row in batch)  # rows stay intact
    seen = [row["answer"] for batch in batches for row in batch]
    assert len(set(seen)) == 8
    # Same seed, same order; shuffled order differs from file order for this seed.
    again = PromptDataModule(train_files=dm.train_files, batch_size=4, seed=3)
    assert [row["answer"] for b in again.train_dataloader() for row in b] == seen
    assert seen != list(range(8))


def test_unshuffled_train_order_and_eval_loaders(tmp_path: Path) -> None:
    path = _prompt_file(tmp_path, 7)
    dm = PromptDataModule(train_files=path, val_files=path, batch_size=3, val_batch_size=2, shuffle=False)
    dm.setup("fit")
    assert [[r["answer"] for r in b] for b in dm.train_dataloader()] == [[0, 1, 2], [3, 4, 5]]
    # Validation keeps the last incomplete batch and uses val_batch_size.
    assert [[r["answer"] for r in b] for b in dm.val_dataloader()] == [[0, 1], [2, 3], [4, 5], [6]]


def test_no_validation_split_gives_empty_list_and_too_few_rows_error(tmp_path: Path) -> None:
    dm = PromptDataModule(train_files=_prompt_file(tmp_path, 3), batch_size=4)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(DataError, match="3 training rows .* fewer than batch_size=4"):
        dm.train_dataloader()
    with pytest.raises(ConfigError, match="test_files"):
        dm.test_dataloader()


# -------------------------------------------------------------------------------------------- countdown


def test_countdown_module_sizes_determinism_and_no_overlap() -> None:
    dm = CountdownDataModule(num_train=300, num_val=40, batch_size=8, seed=5, num_numbers=4)
    dm.setup("fit")
    assert dm.train_rows == generate_countdown_examples(300, seed=5)
    val = generate_countdown_examples(40, seed=5 + 1_000_003)
    train_prompts = {row["prompt"] for row in dm.train_rows}
    assert dm.val_rows == [row for row in val if row["prompt"] not in train_prompts]
    assert 30 <= len(dm.val_rows) <= 40
    again = CountdownDataModule(num_train=300, num_val=40, batch_size=8, seed=5, num_numbers=4)
    again.setup("validate")
    assert again.val_rows == dm.val_rows
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 8 and set(batch[0]) == {"prompt", "answer", "numbers", "solution"}
    assert len(list(dm.train_dataloader())) == 300 // 8


def test_countdown_module_drops_validation_prompts_seen_in_training() -> None:
    # One number in [1, 3] and a one-term solution: only 3 distinct prompts ("n>n:"), so overlap is certain.
    dm = CountdownDataModule(num_train=10, num_val=10, num_numbers=1, max_number=3, min_terms=1, max_terms=1)
    dm.setup("fit")
    train_prompts = {row["prompt"] for row in dm.train_rows or []}
    assert train_prompts <= {"1>1:", "2>2:", "3>3:"}
    assert all(row["prompt"] not in train_prompts for row in dm.val_rows or [])
    assert len(dm.val_rows or []) < 10


def test_countdown_module_validates_sizes() -> None:
    with pytest.raises(ConfigError, match="num_train"):
        CountdownDataModule(num_train=0)
    with pytest.raises(ConfigError, match="num_val"):
        CountdownDataModule(num_val=-1)
    dm = CountdownDataModule(num_train=4, num_val=0, batch_size=8)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    with pytest.raises(DataError, match="num_train=4"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------------- prompts

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "\n": 2} | {chr(c): c - 29 for c in range(32, 127)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="<eos>")


def test_render_prompt_without_template(char_tokenizer: PreTrainedTokenizerFast) -> None:
    assert char_tokenizer.chat_template is None
    assert render_prompt("3 5>8:", char_tokenizer) == "3 5>8:"
    assert render_prompt("3 5>8:", char_tokenizer, system_prompt="Solve.") == "Solve.\n3 5>8:"
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompt([{"role": "user", "content": "hi"}], char_tokenizer)
    with pytest.raises(ConfigError, match="chat_template"):
        render_prompt("hi", char_tokenizer, chat_template=True)


def test_render_prompt_with_template(char_tokenizer: PreTrainedTokenizerFast) -> None:
    char_tokenizer.chat_template = CHAT_TEMPLATE
    assert render_prompt("hi", char_tokenizer) == "<user>hi\n<assistant>"
    assert render_prompt("hi", char_tokenizer, system_prompt="S") == "<system>S\n<user>hi\n<assistant>"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_prompt(messages, char_tokenizer) == "<user>a\n<assistant>b\n<assistant>"
    # chat_template=False ignores the template for plain text.
    assert render_prompt("hi", char_tokenizer, chat_template=False) == "hi"
    with pytest.raises(ConfigError, match="role"):
        render_prompt([{"text": "a"}], char_tokenizer)


def test_a_save_to_disk_folder_loads_like_a_file_and_a_datasetdict_root_names_its_split_folders(
    tmp_path: Path,
) -> None:
    rows = [{"question": "1+1=", "ground_truth": 2}, {"question": "2+3=", "ground_truth": 5}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    loaded = load_prompt_rows(str(tmp_path / "saved"), prompt_field="question", answer_field="ground_truth")
    assert [(row["prompt"], row["answer"]) for row in loaded] == [("1+1=", 2), ("2+3=", 5)]
    assert loaded[0]["ground_truth"] == 2  # the original columns are kept, integers as integers

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "dict"))
    split = load_prompt_rows(str(tmp_path / "dict" / "test"), "question", "ground_truth")
    assert [row["answer"] for row in split] == [2]
    with pytest.raises(
        DataError, match=r"dict: a DatasetDict saved with save_to_disk; name one split's folder"
    ) as info:
        load_prompt_rows(str(tmp_path / "dict"), "question", "ground_truth")
    assert str(tmp_path / "dict" / "test") in str(info.value) and str(tmp_path / "dict" / "train") in str(
        info.value
    )

    data = PromptDataModule(
        train_files=str(tmp_path / "saved"),
        prompt_field="question",
        answer_field="ground_truth",
        batch_size=2,
    )
    data.setup("fit")
    assert [row["answer"] for row in next(iter(data.train_dataloader()))] in ([2, 5], [5, 2])


def test_a_missing_column_lists_the_row_columns_and_names_a_likely_one(tmp_path: Path) -> None:
    path = tmp_path / "trl_style.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n")
    with pytest.raises(DataError) as info:
        load_prompt_rows(str(path))
    assert str(info.value) == (
        f"{path} row 0: missing field 'answer' (answer_field); the rows have columns ['ground_truth', 'prompt']: "
        "set data.init_args.answer_field: ground_truth"
    )
    path.write_text(json.dumps({"text": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(DataError) as info:
        load_prompt_rows(str(path))
    assert (
        str(info.value)
        == f"{path} row 0: missing field 'prompt' (prompt_field); the rows have columns ['answer', 'text']"
    )
