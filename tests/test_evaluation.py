"""pass@k (unbiased estimator) against the closed form with math.comb, and distinct correct completions."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lit_entropy.demo.countdown import countdown_reward
from lit_entropy.errors import ConfigError, DataError
from lit_entropy.evaluation import distinct_answers, distinct_correct, distinct_final_answers, pass_at_k
from lit_entropy.rewards import answer_reader, exact_match, last_number_match, numeric_match


def closed_form(n: int, c: int, k: int) -> float:
    """The definition: 1 - C(n - c, k) / C(n, k), exact integers (math.comb is 0 when k > n - c)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 37])
def test_int_matches_closed_form_for_every_c_and_k(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_by_hand():
    # n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5; the product: 1 - (1 - 2/4) = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n = 5, c = 2, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10 = 0.7; product (1 - 2/4)(1 - 2/5) = 0.3
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k = 1 is the fraction correct c / n
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_edge_cases_c_zero_c_n_and_k_n():
    for n in (1, 4, 100):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # no correct sample: never passes
            assert pass_at_k(n, n, k) == 1.0  # all correct: always passes
    # k = n: every sample is drawn, so any correct one passes
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0
    # n - c < k: every draw of k holds a correct one (C(n - c, k) = 0): exactly 1
    assert pass_at_k(10, 8, 3) == 1.0


def test_large_n_stays_finite_and_matches_closed_form():
    # C(1000, 500) overflows float64; the product form does not
    n, c, k = 1000, 3, 500
    value = pass_at_k(n, c, k)
    assert math.isfinite(value)
    assert value == pytest.approx(closed_form(n, c, k), rel=1e-12)


def test_tensor_matches_int_version_elementwise():
    n, k = 16, 5
    counts = torch.tensor([[0, 1, 2, 3], [7, 11, 12, 16]])  # [2, 4]
    values = pass_at_k(n, counts, k)
    assert isinstance(values, torch.Tensor)
    assert values.shape == counts.shape and values.dtype == torch.float32
    expected = torch.tensor([[closed_form(n, int(c), k) for c in row] for row in counts.tolist()])
    torch.testing.assert_close(values, expected.float(), atol=1e-7, rtol=0)


def test_tensor_of_float_counts_and_empty_tensor():
    values = pass_at_k(4, torch.tensor([1.0, 4.0]), 2)
    torch.testing.assert_close(values, torch.tensor([0.5, 1.0]))
    assert pass_at_k(4, torch.tensor([], dtype=torch.long), 2).shape == (0,)


def test_mean_over_prompts_of_pass_at_1_is_the_accuracy():
    # per-prompt pass@1 = c / n, so the mean over prompts is the fraction of correct samples
    counts = torch.tensor([0, 2, 4, 3])  # n = 4 samples per prompt: 9 of 16 correct
    assert float(pass_at_k(4, counts, 1).mean()) == pytest.approx(9 / 16)


@pytest.mark.parametrize(("n", "k"), [(4, 5), (1, 2), (4, 0), (0, 1)])
def test_bad_k_or_n_is_a_config_error(n, k):
    with pytest.raises(ConfigError, match="k=|num_samples="):
        pass_at_k(n, 0, k)


def test_k_larger_than_n_names_both():
    with pytest.raises(ConfigError, match=r"k=5 must be <= num_samples=4"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("bad", [-1, 5])
def test_count_out_of_range_is_a_data_error(bad):
    with pytest.raises(DataError, match=f"num_correct={bad}"):
        pass_at_k(4, bad, 2)
    with pytest.raises(DataError, match="num_correct holds"):
        pass_at_k(4, torch.tensor([1, bad]), 2)


def test_non_integer_tensor_count_is_a_data_error():
    with pytest.raises(DataError, match="1.5"):
        pass_at_k(4, torch.tensor([1.5]), 2)


def test_distinct_correct_counts_stripped_texts_of_correct_completions_only():
    completions = [" 3+4 ", "3+4", "4+3", "7", "wrong", "4+3\n"]
    correct = [True, True, True, False, False, True]
    # correct texts, stripped: {"3+4", "4+3"}; "7" and "wrong" are not correct
    assert distinct_correct(completions, correct) == 2
    assert distinct_correct(completions, [False] * 6) == 0
    assert distinct_correct([], []) == 0


def test_distinct_correct_length_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="2 completions but 1 correct flags"):
        distinct_correct(["a", "b"], [True])


def test_distinct_answers_counts_stripped_texts_right_or_wrong():
    # stripped: {"3+4", "4+3", "7", "wrong"}
    assert distinct_answers([" 3+4 ", "3+4", "4+3", "7", "wrong", "4+3\n"]) == 4
    assert distinct_answers(["same"] * 5) == 1
    assert distinct_answers([]) == 0


def test_distinct_final_answers_count_what_the_reward_reads_not_the_text():
    texts = ["12", "The answer is 12.", "7 + 5 = 12.0", " 13 ", "13", "no idea"]
    # texts: 6 distinct (5 after stripping: " 13 " and "13" are one); final answers: {12, 13}; "no idea" has none
    assert distinct_answers(texts) == 5
    assert distinct_final_answers(texts, answer_reader(last_number_match)) == 2
    assert distinct_final_answers(["no idea", "none"], answer_reader(last_number_match)) == 0
    assert distinct_final_answers([], answer_reader(last_number_match)) == 0


def test_answer_readers_of_the_built_in_rewards():
    assert answer_reader(numeric_match)("so #### 1,200") == answer_reader(numeric_match)("\\boxed{1200.0}")
    assert answer_reader(numeric_match)("12, no marker") is None
    assert answer_reader(exact_match)(" 3+4\n") == "3+4"
    # a countdown answer is its expression: two expressions of one value are two solutions
    assert answer_reader(countdown_reward)("3+4") != answer_reader(countdown_reward)("4+3")


def test_a_reward_without_a_reader_has_none():
    def custom(completion: str, example: dict) -> float:
        return 0.0

    assert answer_reader(custom) is None
    custom.answer_of = "not callable"  # type: ignore[attr-defined]
    assert answer_reader(custom) is None
    custom.answer_of = str.upper  # type: ignore[attr-defined]
    assert answer_reader(custom) is str.upper
    # a partial of a reward reads answers as the reward does
    assert answer_reader(functools.partial(last_number_match, example={"answer": 1})) is answer_reader(
        last_number_match
    )
