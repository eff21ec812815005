"""``lit-entropy predict``: the policy's greedy completion of every prompt, scored, written to a jsonl file.

`predict_completions` is what `GRPO.predict_step` returns for one batch: one row per prompt, ``{"prompt",
"completion", "reward", "answer"}`` (``reward``: the weighted sum of the reward functions, as in training;
``prompt``: the dataset's prompt as written, text or chat messages). `PredictionWriter` (Lightning's
``BasePredictionWriter``) appends the rows of each batch to ``<log_dir>/predictions.jsonl``; the CLI adds it to
every ``predict`` run. The data modules predict on their test split when they have one, else on the validation
split (`lit_entropy.data`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

__all__ = ["PREDICTIONS_NAME", "PredictionWriter", "predict_completions"]

#: The file `PredictionWriter` writes into the run's log folder (rank 0; rank ``r > 0`` adds ``.rank<r>``).
PREDICTIONS_NAME = "predictions.jsonl"


def predict_completions(module: Any, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One greedy completion per prompt of ``batch`` and its reward (``module``: a `lit_entropy.GRPO`)."""
    rollout = module.generate(batch, greedy=True, num_samples=1)
    rewards = module._score(rollout).total.tolist()
    return [
        {
            "prompt": example.get("prompt"),
            "completion": completion,
            "reward": float(reward),
            "answer": example.get("answer"),
        }
        for example, completion, reward in zip(rollout.examples, rollout.completions, rewards)
    ]


class PredictionWriter(BasePredictionWriter):
    """Appends the rows `predict_step` returns, batch by batch, to ``<log_dir>/predictions.jsonl``.

    Args:
        output_dir: Where the file goes; default: the Trainer's ``log_dir`` (else ``default_root_dir``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.path: str | None = None

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir
        name = (
            PREDICTIONS_NAME if trainer.global_rank == 0 else f"predictions.rank{trainer.global_rank}.jsonl"
        )
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, name)
        open(self.path, "w").close()  # a new run starts a new file

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.path is not None  # set in on_predict_start
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in prediction or []:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == 0 and self.path is not None:
            print(f"lit_entropy: predictions written to {self.path}")
