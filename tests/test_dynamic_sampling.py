"""DAPO dynamic sampling: informative groups kept, more prompts drawn, the rollout and rewards re-assembled."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, IterableDataset

from lit_entropy.dynamic_sampling import DynamicSampling, draw_prompts, sample_informative_groups
from lit_entropy.errors import ConfigError
from lit_entropy.regularizer import scalar_outputs
from lit_entropy.resumable_checkpoint import ResumableCheckpoint
from lit_entropy.reward_scorer import RewardResult
from lit_entropy.reward_spec import Reward
from lit_entropy.rollout import Rollout, concat_groups
from tests.harness import char_code_reward, short_fit

PAD = 9


def fake_rollout(examples: list[dict], group: int = 2) -> Rollout:
    """A rollout whose prompt of example ``i`` has ``len`` tokens ``id`` and whose completions are 1 or 2 long."""
    prompt_width = max(example["len"] for example in examples)
    completion_width = max(example.get("completion", 1) for example in examples)
    rows = [example for example in examples for _ in range(group)]
    prompt_ids = torch.full((len(rows), prompt_width), PAD)
    prompt_mask = torch.zeros(len(rows), prompt_width, dtype=torch.bool)
    completion_ids = torch.full((len(rows), completion_width), PAD)
    completion_mask = torch.zeros(len(rows), completion_width, dtype=torch.bool)
    for row, example in enumerate(rows):
        prompt_ids[row, prompt_width - example["len"] :] = example["id"]
        prompt_mask[row, prompt_width - example["len"] :] = True
        length = example.get("completion", 1)
        completion_ids[row, :length] = 100 + example["id"]
        completion_mask[row, :length] = True
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=torch.tensor([example.get("completion", 1) == 2 for example in rows]),
        completions=[f"c{example['id']}.{row % group}" for row, example in enumerate(rows)],
        examples=rows,
        group_size=group,
        sampler_logprobs=None,
    )


def test_concat_groups_re_pads_prompts_on_the_left_and_completions_on_the_right() -> None:
    first = fake_rollout([{"id": 1, "len": 1}, {"id": 2, "len": 2}])  # P = 2, T = 1
    second = fake_rollout([{"id": 3, "len": 3, "completion": 2}])  # P = 3, T = 2
    joined = concat_groups([(first, torch.tensor([1])), (second, torch.tensor([0]))], pad_id=PAD)
    assert joined.prompt_ids.tolist() == [[PAD, 2, 2], [PAD, 2, 2], [3, 3, 3], [3, 3, 3]]
    assert joined.prompt_mask.tolist() == [[False, True, True]] * 2 + [[True, True, True]] * 2
    assert joined.completion_ids.tolist() == [[102, PAD], [102, PAD], [103, 103], [103, 103]]
    assert joined.completion_mask.tolist() == [[True, False]] * 2 + [[True, True]] * 2
    assert joined.truncated.tolist() == [False, False, True, True]
    assert joined.completions == ["c2.0", "c2.1", "c3.0", "c3.1"]
    assert [example["id"] for example in joined.examples] == [2, 2, 3, 3]
    assert joined.group_size == 2


def result(total: list[float], errors: int = 0) -> RewardResult:
    values = torch.tensor(total)
    return RewardResult(
        total=values,
        per_function={"f": values * 2},
        num_errors=errors,
        errors_per_function={"f": errors} if errors else {},
        first_errors={"f": ValueError(f"{errors}")} if errors else {},
        num_skipped=1,
        skipped_per_function={"f": 1},
    )


def test_reward_results_keep_the_rows_of_the_kept_groups_and_every_count() -> None:
    a, b = result([0.0, 1.0, 2.0, 3.0], errors=2), result([4.0, 5.0], errors=1)
    joined = RewardResult.concat_groups([(a, torch.tensor([1])), (b, torch.tensor([0]))], group_size=2)
    assert joined.total.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert joined.per_function["f"].tolist() == [4.0, 6.0, 8.0, 10.0]
    # the failures of groups that were dropped still happened
    assert (joined.num_errors, joined.errors_per_function, joined.num_skipped) == (3, {"f": 3}, 2)
    assert str(joined.first_errors["f"]) == "2"


def rows(ids: list[int], signal: set[int]) -> list[dict]:
    return [{"id": i, "len": 1, "signal": i in signal} for i in ids]


def score(rollout: Rollout) -> RewardResult:
    """Groups of a row with ``signal`` get rewards 0, 1; the others 1, 1 (all equal)."""
    total = [float(row % 2 or not example["signal"]) for row, example in enumerate(rollout.examples)]
    return result(total)


def run(batch: list[dict], draws: list[list[dict]], max_rounds: int):
    pending = iter(draws)
    return sample_informative_groups(
        batch,
        DynamicSampling(max_rounds=max_rounds),
        generate=fake_rollout,
        score=score,
        draw=lambda count: next(pending)[:count],
        pad_id=PAD,
    )


def test_rounds_are_drawn_until_the_batch_holds_its_number_of_informative_groups() -> None:
    batch = rows([0, 1, 2, 3], signal={1})
    draws = [
        rows([10, 11, 12, 13], signal={10}),
        rows([20, 21, 22, 23], signal={20, 21, 22}),
        rows([], set()),
    ]
    rollout, scores, stats = run(batch, draws, max_rounds=4)
    # 1 informative group in round 1, 1 in round 2, then 2 of round 3's 3: exactly B = 4, in order
    assert [example["id"] for example in rollout.examples] == [1, 1, 10, 10, 20, 20, 21, 21]
    assert scores.total.tolist() == [0.0, 1.0] * 4
    assert (stats.rounds, stats.prompts, stats.zero_std_groups, stats.short) == (3, 12, 7, 0)
    metrics = stats.metrics(torch.device("cpu"))
    assert metrics == {
        "rollout/dynamic_rounds": 3.0,
        "rollout/dynamic_prompts": 12.0,
        "rollout/dynamic_frac_zero_std": pytest.approx(7 / 12),
        "rollout/dynamic_short": 0.0,
    }
    assert scores.num_skipped == 3  # one per scoring call: every round's counts are kept


def test_at_the_cap_the_rollout_is_topped_up_with_uninformative_groups_of_the_first_round() -> None:
    batch = rows([0, 1, 2, 3], signal={1})
    draws = [rows([10, 11, 12, 13], signal={10}), rows([20, 21, 22, 23], signal={20, 21, 22})]
    rollout, scores, stats = run(batch, draws, max_rounds=2)
    assert [example["id"] for example in rollout.examples] == [1, 1, 0, 0, 2, 2, 10, 10]
    assert scores.total.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert (stats.rounds, stats.prompts, stats.short) == (2, 8, 2)


def test_a_batch_that_is_already_informative_draws_nothing() -> None:
    batch = rows([0, 1], signal={0, 1})
    rollout, _, stats = run(batch, draws=[], max_rounds=4)  # a draw would raise StopIteration
    assert [example["id"] for example in rollout.examples] == [0, 0, 1, 1]
    assert (stats.rounds, stats.prompts, stats.zero_std_groups, stats.short) == (1, 2, 0, 0)


def test_prompts_are_drawn_without_replacement_and_collated_by_the_loader() -> None:
    loader = DataLoader([{"id": i} for i in range(10)], batch_size=2, collate_fn=lambda batch: list(batch))
    first = draw_prompts(loader, 10, torch.Generator().manual_seed(0))
    assert sorted(row["id"] for row in first) == list(range(10))
    again = draw_prompts(loader, 3, torch.Generator().manual_seed(0))
    assert again == first[:3]  # the generator decides: a resumed run draws the same prompts


def test_an_iterable_dataset_is_refused_with_the_reason() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            yield {"prompt": "x"}

    with pytest.raises(ConfigError, match="map-style dataset.*Stream"):
        draw_prompts(DataLoader(Stream(), batch_size=None), 2, torch.Generator())


@pytest.mark.parametrize("options", [DynamicSampling(max_rounds=1), DynamicSampling(prompts_per_round=0)])
def test_settings_that_cannot_work_are_refused(options: DynamicSampling) -> None:
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        options.validate()


def odd_answers_only_reward(completion: str, example: dict) -> float:
    """Varies between completions for odd answers; 0.5 for every completion of an even answer (no signal)."""
    return char_code_reward(completion, example) if example["answer"] % 2 else 0.5


class Kept(Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, float]] = []
        self.answers: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(scalar_outputs(outputs))
        self.answers.append([int(row.split(">")[1].rstrip(":")) for row in outputs["prompts"]])


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_fit_trains_only_on_groups_with_a_signal(tiny_model_dir, tmp_path, dynamic: bool) -> None:
    kept = Kept()
    short_fit(
        tiny_model_dir,
        tmp_path,
        [kept],
        iterations=4,
        rewards=[Reward(fn=f"{__name__}.odd_answers_only_reward")],
        dynamic_sampling=DynamicSampling(max_rounds=8) if dynamic else None,
    )
    zero_std = [outputs["rollout/frac_zero_std"] for outputs in kept.outputs]
    if not dynamic:  # the data has even answers: without dynamic sampling some groups carry nothing
        assert max(zero_std) > 0
        assert "rollout/dynamic_rounds" not in kept.outputs[0]
        return
    assert zero_std == [0.0] * 4
    for outputs, answers in zip(kept.outputs, kept.answers, strict=True):
        assert len(answers) == 2 * 4  # B = 2 prompts x G = 4, always
        assert all(answer % 2 for answer in answers)
        assert outputs["rollout/dynamic_short"] == 0.0
        assert outputs["rollout/dynamic_prompts"] == 2 * outputs["rollout/dynamic_rounds"]
    assert max(outputs["rollout/dynamic_rounds"] for outputs in kept.outputs) > 1


def test_a_resumed_fit_draws_the_prompts_the_uninterrupted_one_drew(tiny_model_dir, tmp_path) -> None:
    grpo = {
        "rewards": [Reward(fn=f"{__name__}.odd_answers_only_reward")],
        "dynamic_sampling": DynamicSampling(max_rounds=8),
    }
    straight = Kept()
    short_fit(tiny_model_dir, tmp_path / "straight", [straight], iterations=3, **grpo)
    # saved after iteration 2 of 3, as a run stopped there would be (not at the end of its shortened epoch)
    save = ResumableCheckpoint(dirpath=tmp_path / "first", every_n_train_steps=2)
    short_fit(tiny_model_dir, tmp_path / "first", [save], iterations=3, checkpoint=True, **grpo)
    checkpoint = tmp_path / "first" / "epoch=0-step=2.ckpt"
    resumed = Kept()
    short_fit(
        tiny_model_dir, tmp_path / "resumed", [resumed], iterations=3, ckpt_path=str(checkpoint), **grpo
    )
    assert resumed.answers == straight.answers[2:]
    assert resumed.outputs[0]["rollout/dynamic_rounds"] == straight.outputs[2]["rollout/dynamic_rounds"]
