"""`CompletionLog`: every k RL iterations, a few prompts with their sampled completions, rewards and advantages.

What the policy writes is the first thing to look at when a reward rises (or does not): reward hacking, a prompt
format the model ignores, completions cut at ``max_new_tokens``. Every ``every_n_iterations`` RL iterations
(counted as the progress bar counts them: iteration 10, 20, ...), from the `IterationOutputs` of that iteration:

- the console: a table of the first ``num_prompts`` prompts, each with its ``G`` completions (cut to
  ``max_chars``), total reward, each reward function's value (when there are several) and advantage; drawn with
  rich when it is installed, as aligned text otherwise, printed above the progress bar;
- the loggers: TensorBoard gets the same table as markdown (``add_text("completions", ...)``, its Text tab), a
  W&B logger a table (``log_table(key="completions", ...)``); both at the iteration's ``global_step``;
- ``<log_dir>/completions.jsonl``: every completion of the iteration, one JSON row each, in full: ``iteration``,
  ``step``, ``prompt`` (as the dataset holds it: text or chat messages), ``completion``, ``reward``,
  ``advantage`` and ``rewards_per_function`` (name -> unweighted value).

Rank 0 logs its own rollout (under data parallelism, its share of the prompts). Nothing here changes training.

    trainer:
      callbacks:
        - class_path: lit_entropy.callbacks.CompletionLog
          init_args: {every_n_iterations: 10, num_prompts: 2, max_chars: 300}
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from lit_entropy.errors import ConfigError


def prompt_text(prompt: Any) -> str:
    """A dataset prompt as text: itself, or chat messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) and "content" in m for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in prompt)
    return str(prompt)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "…"


class CompletionLog(Callback):
    """Shows and records sampled completions every ``every_n_iterations`` RL iterations (module docstring).

    Args:
        every_n_iterations: log after every this many RL iterations of the fit.
        num_prompts: prompts shown on the console and sent to the loggers, each with all its completions.
        max_chars: characters of a prompt or completion shown (the jsonl file holds them in full).
        console: print the table.
        filename: the jsonl file under the run's log folder (None: no file); an absolute path is used as is.
    """

    def __init__(
        self,
        every_n_iterations: int = 10,
        num_prompts: int = 2,
        max_chars: int = 300,
        console: bool = True,
        filename: str | None = "completions.jsonl",
    ) -> None:
        for name, value in (
            ("every_n_iterations", every_n_iterations),
            ("num_prompts", num_prompts),
            ("max_chars", max_chars),
        ):
            if value < 1:
                raise ConfigError(f"CompletionLog.{name} must be >= 1, got {value}")
        self.every_n_iterations = every_n_iterations
        self.num_prompts = num_prompts
        self.max_chars = max_chars
        self.console = console
        self.filename = filename

    def path(self, trainer: Trainer) -> str | None:
        """Where the rows go: ``filename`` under ``trainer.log_dir`` (or ``default_root_dir``)."""
        if self.filename is None:
            return None
        return os.path.join(trainer.log_dir or trainer.default_root_dir, self.filename)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        iteration = trainer.fit_loop.total_batch_idx + 1  # RL iterations done, as the progress bar counts
        if iteration % self.every_n_iterations or not trainer.is_global_zero:
            return
        if not isinstance(outputs, Mapping) or "completions" not in outputs:
            return
        rows = completion_rows(outputs, iteration, trainer.global_step)
        path = self.path(trainer)
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8") as file:
                file.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        sampling = getattr(pl_module, "sampling", None)
        group = getattr(sampling, "group_size", None) or _group_size(outputs["prompts"])
        shown = rows[: self.num_prompts * group]
        names = list(outputs.get("rewards_per_function") or {})
        functions = names if len(names) > 1 else []
        title = (
            f"Completions at RL iteration {iteration} (step {trainer.global_step}): "
            f"{min(self.num_prompts, len(rows) // group)} of {len(rows) // group} prompts"
        )
        if self.console:
            text = render_table(shown, group, functions, self.max_chars, title)
            bar = trainer.progress_bar_callback
            if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
                bar.print(text)  # above the bar, which redraws below
            else:
                print(text)
        markdown = markdown_table(shown, group, functions, self.max_chars)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and callable(logger.log_table):  # WandbLogger
                columns, data = table_data(shown, functions, self.max_chars)
                logger.log_table(key="completions", columns=columns, data=data, step=trainer.global_step)
            elif callable(getattr(getattr(logger, "experiment", None), "add_text", None)):  # TensorBoard
                logger.experiment.add_text("completions", f"**{title}**\n\n{markdown}", trainer.global_step)


def completion_rows(outputs: Mapping[str, Any], iteration: int, step: int) -> list[dict[str, Any]]:
    """One dict per completion of the iteration: the jsonl file's rows."""
    rewards = outputs["rewards"].float().tolist()
    advantages = outputs["advantages"].float().tolist()
    per_function = {name: values.float().tolist() for name, values in outputs["rewards_per_function"].items()}
    return [
        {
            "iteration": iteration,
            "step": step,
            "prompt": prompt,
            "completion": completion,
            "reward": rewards[i],
            "advantage": advantages[i],
            "rewards_per_function": {name: values[i] for name, values in per_function.items()},
        }
        for i, (prompt, completion) in enumerate(zip(outputs["prompts"], outputs["completions"], strict=True))
    ]


def _group_size(prompts: Sequence[Any]) -> int:
    """Completions per prompt from the group-contiguous prompts (the first prompt's run)."""
    size = 1
    while size < len(prompts) and prompts[size] == prompts[0]:
        size += 1
    return size


def table_data(
    rows: Sequence[Mapping[str, Any]], functions: Sequence[str], max_chars: int
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the shown completions (one row each, the prompt on every row): the W&B table."""
    columns = ["prompt", "completion", "reward", *functions, "advantage"]
    data = [
        [
            _cut(prompt_text(row["prompt"]), max_chars),
            _cut(row["completion"], max_chars),
            row["reward"],
            *(row["rewards_per_function"].get(name) for name in functions),
            row["advantage"],
        ]
        for row in rows
    ]
    return columns, data


def _cells(
    rows: Sequence[Mapping[str, Any]], group: int, functions: Sequence[str], max_chars: int
) -> tuple[list[str], list[list[str]]]:
    """Header and text cells; the prompt only on the first row of its group."""
    header = ["prompt", "completion", "reward", *functions, "advantage"]
    cells = []
    for i, row in enumerate(rows):
        cells.append(
            [
                _cut(prompt_text(row["prompt"]), max_chars) if i % group == 0 else "",
                _cut(row["completion"], max_chars),
                f"{row['reward']:.3f}",
                *(f"{row['rewards_per_function'].get(name, float('nan')):.3f}" for name in functions),
                f"{row['advantage']:+.3f}",
            ]
        )
    return header, cells


def render_table(
    rows: Sequence[Mapping[str, Any]], group: int, functions: Sequence[str], max_chars: int, title: str
) -> str:
    """The console table: rich's when rich is installed, aligned text otherwise."""
    header, cells = _cells(rows, group, functions, max_chars)
    if find_spec("rich") is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for column in header:
            numeric = column not in ("prompt", "completion")
            table.add_column(column, justify="right" if numeric else "left", no_wrap=numeric)
        for i, line in enumerate(cells):
            table.add_row(*line, end_section=(i + 1) % group == 0)  # a rule between prompts
        output = io.StringIO()
        width = shutil.get_terminal_size((120, 24)).columns
        console = Console(file=output, width=width, color_system=None, markup=False, highlight=False)
        console.print(title, soft_wrap=True)
        console.print(table)
        return output.getvalue().rstrip("\n")
    flat = [[cell.replace("\n", "⏎") for cell in line] for line in cells]
    widths = [max(len(column), *(len(line[c]) for line in flat)) for c, column in enumerate(header)]
    lines = [title, "  ".join(column.ljust(widths[c]) for c, column in enumerate(header))]
    lines += ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(line)) for line in flat]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], group: int, functions: Sequence[str], max_chars: int
) -> str:
    """The table as markdown (TensorBoard's Text tab): ``|`` escaped, line breaks as ``<br>``."""
    header, cells = _cells(rows, group, functions, max_chars)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(text) for text in line) + " |" for line in cells]
    return "\n".join(lines)


__all__ = ["CompletionLog", "completion_rows", "markdown_table", "prompt_text", "render_table", "table_data"]
