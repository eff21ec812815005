"""`SFT`: supervised fine-tuning on prompt/solution pairs (the warm-up before RL on the embedded task).

A random model cannot earn reward, so RL needs a policy that already produces the answer format; a short
supervised pass on generated solutions gives it one. The loss is the token mean of the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from typing_extensions import override

IGNORE_INDEX = -100  # label value that Hugging Face causal-LM losses skip


def supervised_batch(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], completion_field: str = "solution"
) -> dict[str, Tensor]:
    """Tokenise ``prompt + completion + EOS`` rows into a right-padded batch with labels on the completion only.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``[n, L]``; ``labels`` is ``IGNORE_INDEX`` on
        prompt and padding positions.
    """
    input_ids, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(str(row[completion_field]), add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        input_ids.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion)
    length = max(len(ids) for ids in input_ids)
    pad = tokenizer.pad_token_id
    batch_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    batch_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(input_ids, labels)):
        batch_ids[i, : len(ids)] = torch.tensor(ids)
        batch_labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": batch_ids, "attention_mask": attention, "labels": batch_labels}


class SFT(LightningModule):
    """Supervised fine-tuning of a causal LM on batches from `supervised_batch`.

    Args:
        model: a Hugging Face causal LM (any trainable parameters are optimised).
        learning_rate: AdamW learning rate, decayed linearly to 10% over ``max_steps`` when the Trainer has them.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self, model: torch.nn.Module, learning_rate: float = 3e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("sft/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
