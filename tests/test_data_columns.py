"""Dataset values keep the types they were written with; NaN answers and unknown prompt characters are reported.

An Arrow table holds one type per column, so through ``datasets`` one ``NaN`` (or ``2.5``) in a JSON column of
integers made every integer a float (``10`` -> ``10.0``), and rewards comparing text failed on every other row.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from lit_entropy.data import PromptDataModule
from lit_entropy.errors import DataError
from lit_entropy.prompt_characters import control_characters, warn_unknown_characters
from lit_entropy.prompt_files import load_prompt_rows
from lit_entropy.reward_scorer import RewardScorer
from lit_entropy.reward_spec import Reward


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------- types kept


def test_a_float_row_does_not_turn_the_integers_of_a_jsonl_column_into_floats(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "answer": 10 + i} for i in range(127)] + [{"prompt": "q", "answer": 2.5}]
    loaded = load_prompt_rows(_jsonl(tmp_path / "train.jsonl", rows))
    assert [row["answer"] for row in loaded] == [row["answer"] for row in rows]
    assert all(type(row["answer"]) is int for row in loaded[:127])
    # exact_match compares text: "10" against 10, not against 10.0.
    scorer = RewardScorer([Reward("lit_entropy.rewards.exact_match")])
    result = scorer([str(row["answer"]) for row in rows], loaded)
    assert result.num_errors == 0 and result.per_function["exact_match"].sum().item() == 128


def test_a_nan_answer_is_an_error_naming_the_file_row_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", '{"prompt": "a", "answer": 10}\n{"prompt": "b", "answer": NaN}\n')
    with pytest.raises(DataError) as info:
        load_prompt_rows(path)
    assert (
        str(info.value)
        == f"{path} row 1: field 'answer' (answer_field) is NaN; write a value or drop the row"
    )


def test_a_nan_prompt_is_an_error_too(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.json", '[{"prompt": "a", "answer": 1}, {"prompt": NaN, "answer": 2}]')
    with pytest.raises(DataError, match=r"row 1: field 'prompt' \(prompt_field\) is NaN"):
        load_prompt_rows(path)


def test_other_columns_keep_nan_null_and_integers_as_written(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.jsonl",
        '{"prompt": "a", "answer": 1, "score": 10}\n'
        '{"prompt": "b", "answer": 2, "score": NaN}\n'
        '{"prompt": "c", "answer": 3, "score": null, "extra": [1, "x"]}\n',
    )
    rows = load_prompt_rows(path)
    assert rows[0]["score"] == 10 and type(rows[0]["score"]) is int
    assert math.isnan(rows[1]["score"]) and rows[2]["score"] is None
    # every row has every column, as before (None where a row lacks it)
    assert rows[0]["extra"] is None and rows[2]["extra"] == [1, "x"]


def test_a_csv_integer_column_with_an_empty_cell_keeps_its_integers(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "prompt,answer,id,ratio\na,10,1,0.5\nb,11,,1.5\nc,007,3,2\n")
    rows = load_prompt_rows(path)
    assert [row["answer"] for row in rows] == [10, 11, 7]
    assert [row["id"] for row in rows] == [1, None, 3] and type(rows[0]["id"]) is int
    assert [row["ratio"] for row in rows] == [0.5, 1.5, 2]  # "2" is written as an integer
    empty_answer = _write(tmp_path / "bad.csv", "prompt,answer\na,10\nb,\n")
    with pytest.raises(DataError, match=r"bad.csv row 1: missing field 'answer'"):
        load_prompt_rows(empty_answer)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.json", '[{"prompt": "a", "answer": 10}, {"prompt": "b", "answer": 2.5}]'),
        ("lines.json", '{"prompt": "a", "answer": 10}\n{"prompt": "b", "answer": 2.5}\n'),
        ("list.jsonl", '[{"prompt": "a", "answer": 10}, {"prompt": "b", "answer": 2.5}]'),
        ("bom.jsonl", '\ufeff{"prompt": "a", "answer": 10}\n\n{"prompt": "b", "answer": 2.5}\n'),
    ],
)
def test_json_layouts_that_datasets_read_still_load(tmp_path: Path, name: str, text: str) -> None:
    rows = load_prompt_rows(_write(tmp_path / name, text))
    assert [(row["prompt"], row["answer"]) for row in rows] == [("a", 10), ("b", 2.5)]
    assert type(rows[0]["answer"]) is int


def test_one_object_and_a_list_of_strings_in_a_json_file(tmp_path: Path) -> None:
    one = load_prompt_rows(_write(tmp_path / "one.json", '{"prompt": "a", "answer": 3}'))
    assert one == [{"prompt": "a", "answer": 3}]
    texts = load_prompt_rows(
        _write(tmp_path / "texts.json", '["x", "y"]'), prompt_field="text", answer_field=None
    )
    assert texts == [{"text": "x", "prompt": "x"}, {"text": "y", "prompt": "y"}]


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a\u2028b", "answer": 1}\n', encoding="utf-8")
    assert load_prompt_rows(str(path))[0]["prompt"] == "a\u2028b"


def test_json_files_without_rows_or_with_a_bad_item(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty.json: file has no rows"):
        load_prompt_rows(_write(tmp_path / "empty.json", "[]"))
    with pytest.raises(DataError, match=r"blank.jsonl: file has no rows"):
        load_prompt_rows(_write(tmp_path / "blank.jsonl", "\n\n"))
    with pytest.raises(
        DataError, match=r"mixed.json: cannot be read as json: item 1 of the list: expected a JSON"
    ):
        load_prompt_rows(_write(tmp_path / "mixed.json", '[{"prompt": "a"}, 3]'))


# ------------------------------------------------------------------------------------------ characters


def test_control_characters_in_prompts_warn_once_per_file_naming_row_and_characters(tmp_path: Path) -> None:
    rows = [
        {"prompt": "fine\twith tab\nand newline", "answer": 1},
        {"prompt": "red \x1b[31m text\x00", "answer": 2},
        {"prompt": "bell \x07", "answer": 3},
    ]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.warns(UserWarning) as record:
        load_prompt_rows(path)
    messages = [str(w.message) for w in record if "control characters" in str(w.message)]
    assert len(messages) == 1
    assert f"{path}: 2 row(s) have control characters" in messages[0]
    assert f"first {path} row 1 field 'prompt': '\\x1b' (U+001B), '\\x00' (U+0000)" in messages[0]
    assert "'\\x07' (U+0007)" in messages[0]
    assert control_characters(rows[:1], ["r0"]) is None  # tab and newline are text


def test_characters_outside_the_char_tokenizer_warn_once(char_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [
        {"prompt": "7 + 5 = ?"},
        {"prompt": [{"role": "user", "content": "plain"}, {"role": "user", "content": "party \U0001f389 é"}]},
        {"prompt": "again \U0001f389"},
    ]
    sources = ["t.jsonl row 0", "t.jsonl row 1", "t.jsonl row 2"]
    with pytest.warns(UserWarning) as record:
        found = warn_unknown_characters(char_tokenizer, rows, sources, "messages")
    assert found == ["\U0001f389", "é"]
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 row(s) have prompt characters the tokenizer encodes as its unknown token '<unk>'" in message
    assert "first t.jsonl row 1 field 'messages' message 1: '\U0001f389' (U+1F389), 'é' (U+00E9)" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unknown_characters(char_tokenizer, rows[:1], sources[:1]) == []
        assert warn_unknown_characters(SimpleNamespace(unk_token_id=None), rows, sources) == []


def test_the_data_module_checks_each_split_once_with_the_fitted_modules_tokenizer(
    tmp_path: Path, char_tokenizer: PreTrainedTokenizerFast
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i} \U0001f600", "answer": i} for i in range(4)])
    data = PromptDataModule(train_files=train, batch_size=2, shuffle=False)
    data.setup("fit")
    progress = SimpleNamespace(current=SimpleNamespace(processed=0))
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        global_rank=0,
        world_size=1,
        lightning_module=SimpleNamespace(tokenizer=char_tokenizer),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    with pytest.warns(UserWarning, match=rf"4 row\(s\) .* first {train} row 0 field 'prompt': '\U0001f600'"):
        data.train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.train_dataloader()  # once per split
