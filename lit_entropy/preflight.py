"""Checks that need both the loaded policy/tokenizer and the data, run once before any compute.

`GRPO.__init__` validates each config object on its own (`Policy.validate`, `Sampling.validate`,
`Loss.validate`) and the data module validates its files as it loads them. What only shows up when the two
meet is checked here, once the tokenizer and model are loaded and the data module is set up, so that a bad
combination fails in seconds with one message naming the field, file, row or value, instead of at the first
training step (or never, as with prompts silently cut by the model's context):

- the rollout size ``N = data.batch_size * sampling.group_size`` is split exactly into mini-batches and
  those into micro-batches (`lit_entropy.minibatch.BatchSplit`);
- the tokenizer has an EOS token (completions must end) and a pad token (`check_special_tokens`),
  a chat template when ``chat_template=True`` (`check_chat_template`), and no ids past the model's
  embedding table (`check_vocabulary`);
- ``sampling.max_new_tokens`` (and ``max_prompt_length``) fit in the model's context (`check_generation_budget`);
- every prompt renders, and its token count plus ``max_new_tokens`` fits in the context and under
  ``sampling.max_prompt_length`` (`check_prompt_lengths`), naming the file and row;
- each reward function, called on the first training rows (their reference answers as the completions, in
  the function's form), does not fail for want of a field of the rows (``example["answer"]`` with
  ``data.answer_field: null``), for a signature that does not take its form's arguments, or on every one of
  them (`check_reward_calls`).

Each check is a plain function of the values it needs; `preflight` gathers them from a `GRPO` module and a
data module.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_entropy.errors import ConfigError, DataError, ModelLoadError
from lit_entropy.prompts import render_prompt
from lit_entropy.reward_forms import (
    BATCHED_SIGNATURE,
    PER_COMPLETION_SIGNATURE,
    signature_mismatch,
    signature_text,
)
from lit_entropy.reward_scorer import RewardFailureError

__all__ = [
    "check_chat_template",
    "check_generation_budget",
    "check_prompt_lengths",
    "check_reward_calls",
    "check_reward_fields",
    "check_special_tokens",
    "check_vocabulary",
    "model_context_length",
    "preflight",
    "render_prompts",
]

_SPLITS = ("train", "val", "test")
_TOKENIZE_CHUNK = 1024


def check_special_tokens(tokenizer: Any, where: str) -> None:
    """The tokenizer has an EOS token (where completions end) and a pad token (to batch prompts).

    `lit_entropy.tokenizer.load_tokenizer` already pads with EOS when there is no pad token; this catches
    tokenizers built or modified in code.

    Raises:
        ModelLoadError: Naming ``where`` (the tokenizer's folder) and the missing token.
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ModelLoadError(
            f"the tokenizer of {where} has no eos token, so no completion could ever end; "
            "set eos_token in its tokenizer_config.json"
        )
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ModelLoadError(
            f"the tokenizer of {where} has no pad token; set pad_token in its tokenizer_config.json "
            "(padding with the eos token is fine: padding is masked out)"
        )


def check_chat_template(tokenizer: Any, chat_template: bool | None, where: str) -> None:
    """``chat_template=True`` needs a tokenizer that defines one.

    Raises:
        ConfigError: Naming ``model.chat_template`` and the tokenizer's folder.
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model.chat_template=true but the tokenizer of {where} has no chat template "
            "(none in its tokenizer_config.json or chat_template.jinja); set model.chat_template to null "
            "(use it when present) or false, or use a tokenizer that defines one"
        )


def check_vocabulary(model: Any, tokenizer: Any, where: str) -> None:
    """Every id the tokenizer can produce has a row in the model's input embedding.

    Raises:
        ModelLoadError: The tokenizer (e.g. ``policy.tokenizer_path`` of another model) has more ids than the
            model has embeddings.
    """
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer of {where} has {len(tokenizer)} ids but the model's embedding table has only {rows} "
            "rows: is policy.tokenizer_path the tokenizer of another model?"
        )


def model_context_length(model: Any) -> int | None:
    """The model's context length from its config (``max_position_embeddings`` or an alias), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_generation_budget(max_new_tokens: int, max_prompt_length: int | None, context: int | None) -> None:
    """``max_new_tokens`` (plus ``max_prompt_length`` when set) fits in the model's context.

    Raises:
        ConfigError: Naming the sampling fields and the model's ``max_position_embeddings``.
    """
    if context is None:
        return
    if max_new_tokens >= context:
        raise ConfigError(
            f"model.sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of max_position_embeddings={context} tokens; lower it"
        )
    if max_prompt_length is not None and max_prompt_length + max_new_tokens > context:
        raise ConfigError(
            f"model.sampling.max_prompt_length + max_new_tokens = {max_prompt_length} + {max_new_tokens} = "
            f"{max_prompt_length + max_new_tokens} exceeds the model's max_position_embeddings={context}"
        )


def _sources(rows: Sequence[Any], sources: Sequence[str] | None, split: str) -> Sequence[str]:
    if sources is not None and len(sources) == len(rows):
        return sources
    return [f"{split} row {index}" for index in range(len(rows))]


def render_prompts(
    rows: Sequence[Mapping[str, Any]],
    sources: Sequence[str],
    tokenizer: Any,
    chat_template: bool | None,
    system_prompt: str | None,
) -> list[str]:
    """Each row's prompt as the model will see it (`render_prompt`), naming the row when one cannot be rendered.

    Raises:
        DataError: ``"<file> row <i>: <why>"``, e.g. chat messages with a tokenizer that has no template.
    """
    rendered = []
    for row, source in zip(rows, sources):
        if "prompt" not in row:
            raise DataError(f"{source}: the row has no 'prompt' field (columns: {', '.join(map(str, row))})")
        try:
            rendered.append(render_prompt(row["prompt"], tokenizer, chat_template, system_prompt))
        except ConfigError as err:
            raise DataError(f"{source}: {err}") from err
    return rendered


def check_prompt_lengths(
    prompts: Sequence[str],
    sources: Sequence[str],
    tokenizer: Any,
    max_new_tokens: int,
    context: int | None,
    max_prompt_length: int | None = None,
) -> int:
    """Every rendered prompt fits: ``tokens <= max_prompt_length`` and ``tokens + max_new_tokens <= context``.

    Prompts are tokenized as the rollout does (``add_special_tokens=False``), ``1024`` at a time.

    Returns:
        The longest prompt in tokens (0 for no prompts).

    Raises:
        DataError: Naming the first offending row (file and index), its length, the limit and the prompt's
            first 40 characters.
    """
    longest = 0
    for start in range(0, len(prompts), _TOKENIZE_CHUNK):
        chunk = list(prompts[start : start + _TOKENIZE_CHUNK])
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for offset, token_ids in enumerate(ids):
            length = len(token_ids)
            longest = max(longest, length)
            index = start + offset
            if max_prompt_length is not None and length > max_prompt_length:
                raise DataError(
                    f"{sources[index]}: prompt has {length} tokens, more than "
                    f"model.sampling.max_prompt_length={max_prompt_length}: {prompts[index][:40]!r}"
                )
            if context is not None and length + max_new_tokens > context:
                raise DataError(
                    f"{sources[index]}: prompt has {length} tokens; with model.sampling.max_new_tokens="
                    f"{max_new_tokens} that is {length + max_new_tokens}, more than the model's "
                    f"max_position_embeddings={context}: {prompts[index][:40]!r}; shorten or drop the row, "
                    "or lower max_new_tokens"
                )
    return longest


#: Rows of the first split whose answers the reward functions score before training (`check_reward_calls`).
PROBE_ROWS = 4


def check_reward_calls(
    scorer: Any, rows: Sequence[Mapping[str, Any]], sources: Sequence[str], tokenizer: Any = None
) -> None:
    """Scores each row's answer as a completion, to stop a reward function that cannot work before training.

    Each function is called as in training (its form, timeout and process), on ``len(rows)`` completions
    (`PROBE_ROWS` in `preflight`): the rows' answers as text, their prompts from the rows, and, for the batched
    form, their token ids from ``tokenizer`` (None without one). What stops the run here:

    - a function that reads a field the rows lack (``example["answer"]`` with ``data.answer_field: null``):
      every completion would fail, and the run would go on with constant rewards and zero advantages;
    - a function whose signature does not take the arguments of its form (a `TypeError` from the call, the
      arguments checked with ``inspect.signature``), always;
    - a function failing on every completion for another reason, unless the scorer only counts failures
      (``max_error_fraction`` None: ``model.reward_max_error_fraction: null``).

    Other failures are left to training, where they are counted per completion.

    Raises:
        DataError: A missing field, naming the reward, the field, the row and its columns.
        RewardFailureError: A function failing on every completion, naming it, its form, its signature and
            the exception; for a signature mismatch both accepted signatures.
    """
    completions = [str(row.get("answer", "")) for row in rows]
    ids = None
    if tokenizer is not None and any(form == "batched" for form in scorer.forms):
        ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rewards_log = logging.getLogger("lit_entropy.reward_scorer")
    disabled, rewards_log.disabled = rewards_log.disabled, True  # a probe's failure is not a training warning
    try:
        result = scorer(completions, list(rows), completion_ids=ids, check_failures=False)
    finally:
        rewards_log.disabled = disabled
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "prompt"))
    for index, (name, function, form) in enumerate(zip(scorer.names, scorer.functions, scorer.forms)):
        error = result.first_errors.get(name)
        if error is None:
            continue
        reward = scorer.rewards[index]
        if isinstance(error, KeyError) and error.args:
            lacking = [source for row, source in zip(rows, sources) if error.args[0] not in row]
            if lacking:
                raise DataError(
                    f"reward {name!r} (model.rewards[{index}]) reads field {error.args[0]!r} of the dataset rows, "
                    f"but {lacking[0]} has none (columns: {', '.join(map(str, rows[0]))}); set data.answer_field "
                    "(or the data) so that the rows carry it"
                )
        if result.errors_per_function[name] < len(rows):
            continue
        mismatch = signature_mismatch(function, form, reward.kwargs, columns)
        if mismatch is None and scorer.max_error_fraction is None:
            continue  # only counted, as the scorer was told
        probed = (
            f"the answer of {sources[0]} scored as a completion"
            if len(rows) == 1
            else f"the answers of {sources[0]} to {sources[len(rows) - 1]} scored as completions"
        )
        message = (
            f"reward {name!r} ({reward.fn}, model.rewards[{index}]) failed on {len(rows)} of {len(rows)} "
            f"completions of the check before training (every completion; {probed}): "
            f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        )
        if mismatch is not None:
            told = "set" if reward.form != "auto" else "told from its signature"
            message += (
                f"; it was called in the {form.replace('_', '-')} form ({told}) and its signature "
                f"{signature_text(function)} does not take those arguments ({mismatch}); a reward function is "
                f"called either per completion as {PER_COMPLETION_SIGNATURE}, or in TRL's batched form as "
                f"{BATCHED_SIGNATURE} (the dataset columns as keyword lists: {', '.join(map(str, columns)) or 'none'}); "
                "fix the signature, or set form: batched or form: per_completion on the reward"
            )
        else:
            message += (
                "; a function failing on every completion stops the run (model.reward_max_error_fraction: null "
                "only counts failures)"
            )
        raise RewardFailureError(message)


def check_reward_fields(scorer: Any, row: Mapping[str, Any], source: str) -> None:
    """`check_reward_calls` on one row (its answer as the completion), without token ids."""
    check_reward_calls(scorer, [row], [source])


def _describe_tokenizer(policy_config: Any) -> str:
    path = getattr(policy_config, "tokenizer_path", None) or getattr(policy_config, "path", None)
    if path is not None:
        field = "policy.tokenizer_path" if getattr(policy_config, "tokenizer_path", None) else "policy.path"
        return f"{field} '{path}'"
    return "the embedded model" if getattr(policy_config, "embedded", None) is not None else "the policy"


def check_writable(folder: str | os.PathLike[str], what: str) -> None:
    """The folder exists and takes a file, or can be created: found before compute, not at the first save.

    Creates nothing that stays: the nearest existing folder on the way receives one temporary file, removed at
    once.

    Raises:
        ConfigError: Naming ``what``, the folder and why it cannot be written.
    """
    path = Path(folder).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} '{folder}' cannot be created: '{existing}' is a file, not a folder")
    try:
        handle, name = tempfile.mkstemp(dir=existing, prefix=".lit_entropy-write-check-")
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise ConfigError(
            f"{what} '{folder}' is not writable ({error.strerror or error} in '{existing}'): "
            "choose another folder, or fix its permissions, before training"
        ) from None


def preflight(module: Any, datamodule: Any = None, *, check_rewards: bool = True) -> None:
    """Runs every check above on a `GRPO` module whose policy is loaded and a data module that is set up.

    Call it after ``configure_model`` and the data module's ``setup`` and before the first rollout, e.g.
    from ``GRPO.on_fit_start``: ``preflight(self, self.trainer.datamodule)``. It tokenizes every loaded
    prompt (train, val and test rows) once and scores `PROBE_ROWS` completions with each reward function;
    nothing runs on the model.

    Args:
        module: A `GRPO` (reads ``policy``, ``tokenizer``, ``policy_config``, ``sampling``, ``loss_config``,
            ``minibatch_size``, ``microbatch_size``, ``chat_template``, ``system_prompt``, ``reward_scorer``).
        datamodule: The data module, or None (data checks are then skipped). Rows are read from its
            ``train_rows``/``val_rows``/``test_rows`` and located with ``*_sources`` when present
            (`lit_entropy.data.PromptDataModule` has both).
        check_rewards: Score the first rows' answers with each reward function (`check_reward_calls`).

    Raises:
        ConfigError, DataError, ModelLoadError: The first problem found, naming the field, file, row or value.
    """
    sampling = module.sampling
    batch_size = getattr(datamodule, "batch_size", None)
    if isinstance(batch_size, int) and batch_size > 0:
        module.batch_split(batch_size)  # raises ConfigError naming the sizes that do not divide

    tokenizer = getattr(module, "tokenizer", None)
    model = getattr(module, "policy", None)
    if tokenizer is None or model is None:
        return  # called before configure_model: nothing more can be checked
    where = _describe_tokenizer(getattr(module, "policy_config", None))
    check_special_tokens(tokenizer, where)
    check_chat_template(tokenizer, module.chat_template, where)
    check_vocabulary(model, tokenizer, where)
    context = model_context_length(model)
    check_generation_budget(sampling.max_new_tokens, sampling.max_prompt_length, context)

    first: tuple[Sequence[Mapping[str, Any]], Sequence[str]] | None = None
    for split in _SPLITS:
        rows = getattr(datamodule, f"{split}_rows", None)
        if not rows:
            continue
        sources = _sources(rows, getattr(datamodule, f"{split}_sources", None), split)
        prompts = render_prompts(rows, sources, tokenizer, module.chat_template, module.system_prompt)
        check_prompt_lengths(
            prompts, sources, tokenizer, sampling.max_new_tokens, context, sampling.max_prompt_length
        )
        if first is None:
            first = (rows[:PROBE_ROWS], sources[:PROBE_ROWS])
    if check_rewards and first is not None:
        check_reward_calls(module.reward_scorer, *first, tokenizer=tokenizer)
