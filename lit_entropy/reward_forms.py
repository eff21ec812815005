"""The two forms a reward function is called in, how ``form: auto`` tells them apart, and the batched arguments.

**Per completion** (this project's form): ``fn(completion: str, example: dict, **kwargs) -> float``, called once
for each completion with its dataset row.

**Batched** (TRL ``GRPOTrainer``'s form): ``fn(prompts, completions, completion_ids, **columns) -> list[float |
None]``, called once for the N completions of a scoring call, every argument a keyword:

- ``prompts``: each completion's dataset prompt as written in the data (a string, or a list of chat messages);
- ``completions``: the texts, or ``[{"role": "assistant", "content": text}]`` where the prompt is a list of
  messages (a conversational dataset);
- ``completion_ids``: each completion's token ids (up to and including its EOS), or ``None`` when the caller
  did not pass them;
- every other dataset column (``answer``, ...) as a list with one entry per completion, and the reward's
  ``kwargs`` as given.

It returns one value per completion: a number, or ``None`` where the function does not apply (it then adds
nothing to that completion's total, as in TRL).

``form: auto`` (the default) reads ``inspect.signature(fn)``: **batched** when the first parameter is named
``prompts`` or ``completions``, and the function can receive ``completions`` (a parameter of that name, or
``**kwargs``); **per completion** otherwise, including a signature Python cannot read and ``(*args,
**kwargs)``. A first parameter named ``prompts`` without a way to receive ``completions`` is ambiguous: a
`ConfigError` asks for ``form: batched`` or ``form: per_completion``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from lit_entropy.errors import ConfigError

__all__ = [
    "BATCHED_ARGUMENTS",
    "BATCHED_SIGNATURE",
    "FORMS",
    "PER_COMPLETION_SIGNATURE",
    "batched_arguments",
    "batched_values",
    "completion_token_ids",
    "detect_form",
    "is_async",
    "reward_value",
    "signature_mismatch",
    "signature_text",
]

PER_COMPLETION_SIGNATURE = "fn(completion: str, example: dict, **kwargs) -> float"
BATCHED_SIGNATURE = "fn(prompts, completions, completion_ids, **columns) -> list[float | None]"
#: The keywords of the batched form besides the dataset columns.
BATCHED_ARGUMENTS = ("prompts", "completions", "completion_ids")
FORMS = ("auto", "batched", "per_completion")


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def signature_text(function: Callable[..., Any]) -> str:
    """``"(completion: str, example: dict)"``, or ``"(signature unknown)"``, for messages."""
    signature = _signature(function)
    return "(signature unknown)" if signature is None else str(signature)


def detect_form(function: Callable[..., Any], form: str, where: str) -> str:
    """The form ``function`` is called in: ``"batched"`` or ``"per_completion"``.

    Args:
        function: The reward function.
        form: ``Reward.form``: ``"batched"`` or ``"per_completion"`` are returned as they are; ``"auto"`` reads
            the signature (rule in this module's docstring).
        where: Names the reward in messages, e.g. ``"rewards[0] ('my.fn')"``.

    Raises:
        ConfigError: ``form`` is none of the three, or ``auto`` meets a first parameter ``prompts`` with no way
            to receive ``completions``.
    """
    if not isinstance(form, str) or form not in FORMS:
        raise ConfigError(f"{where}: form must be one of 'auto', 'batched', 'per_completion', got {form!r}")
    if form != "auto":
        return form
    signature = _signature(function)
    if signature is None or not signature.parameters:
        return "per_completion"
    parameters = list(signature.parameters.values())
    if parameters[0].name not in ("prompts", "completions"):
        return "per_completion"
    takes_completions = "completions" in signature.parameters or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters
    )
    if takes_completions:
        return "batched"
    raise ConfigError(
        f"{where}: cannot tell how to call a function with the signature {signature}: its first parameter "
        "'prompts' is that of TRL's batched form, but it cannot receive 'completions'; the two forms are "
        f"{PER_COMPLETION_SIGNATURE} and {BATCHED_SIGNATURE}: fix the signature or set form: batched or "
        "form: per_completion on the reward"
    )


def is_async(function: Callable[..., Any]) -> bool:
    """``async def`` functions, ``functools.partial`` of one, and objects with an ``async def __call__``."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - the method, for callable instances
    )


def completion_token_ids(completion_ids: Tensor, completion_mask: Tensor) -> list[list[int]]:
    """Each completion's token ids, padding dropped: what the batched form receives as ``completion_ids``.

    Args:
        completion_ids: ``[N, T]`` right-padded ids (`lit_entropy.rollout.Rollout.completion_ids`).
        completion_mask: ``[N, T]`` keep-mask, True up to and including the first EOS
            (`lit_entropy.rollout.Rollout.completion_mask`).

    Returns:
        ``N`` lists of ints (TRL's ``completion_ids``: the kept tokens, EOS included where sampled).
    """
    ids = completion_ids.detach().cpu()
    mask = completion_mask.detach().cpu().bool()
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def batched_arguments(
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    prompts: Sequence[Any] | None,
    completion_ids: Sequence[Sequence[int]] | None,
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The keyword arguments of one batched call (a pure function of its inputs; the rows are not copied).

    Args:
        completions: ``N`` completion texts.
        examples: ``N`` dataset rows.
        prompts: ``N`` prompts, or ``None``: each row's ``"prompt"`` (``None`` where a row has none).
        completion_ids: ``N`` token id lists, or ``None`` (passed on as ``None``).
        kwargs: The reward's ``kwargs``.

    Returns:
        ``prompts``, ``completions`` (messages where the row's prompt, or else the prompt passed, is a list of
        chat messages), ``completion_ids``, then every column of the rows but ``"prompt"`` as an ``N``-list
        (columns in the order first seen; ``None`` where a row lacks one), then ``kwargs``.

    Raises:
        ValueError: A column or a ``kwargs`` key has the name of another argument, or a length differs from N.
    """
    count = len(completions)
    if prompts is None:
        prompts = [example.get("prompt") for example in examples]
    if len(prompts) != count or (completion_ids is not None and len(completion_ids) != count):
        raise ValueError(
            f"got {count} completions, {len(prompts)} prompts and "
            f"{'no' if completion_ids is None else len(completion_ids)} completion_ids; pass one per completion"
        )
    shown = [
        [{"role": "assistant", "content": text}] if isinstance(example.get("prompt", prompt), list) else text
        for text, example, prompt in zip(completions, examples, prompts)
    ]
    arguments: dict[str, Any] = {
        "prompts": list(prompts),
        "completions": shown,
        "completion_ids": None if completion_ids is None else [list(ids) for ids in completion_ids],
    }
    columns = list(dict.fromkeys(key for example in examples for key in example if key != "prompt"))
    for column in columns:
        if column in arguments:
            raise ValueError(
                f"the dataset column {column!r} has the name of an argument of the batched form "
                f"({', '.join(BATCHED_ARGUMENTS)}); rename the column"
            )
        arguments[column] = [example.get(column) for example in examples]
    for key, value in kwargs.items():
        if key in arguments:
            raise ValueError(
                f"the reward's kwargs key {key!r} is also "
                f"{'an argument of the batched form' if key in BATCHED_ARGUMENTS else 'a dataset column'}; "
                "rename it"
            )
        arguments[key] = value
    return arguments


def batched_values(result: Any, count: int) -> list[Any]:
    """The ``count`` per-completion values of a batched call's result (a list, tuple, 1-D tensor or array).

    Raises:
        TypeError: The result is not a sequence (a string, a mapping, a number).
        ValueError: It holds another number of values than ``count``.
    """
    if isinstance(result, Tensor) or type(result).__module__ == "numpy":
        result = result.tolist() if getattr(result, "ndim", 1) == 1 else result
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Sequence):
        raise TypeError(
            f"returned {type(result).__name__}, expected a list of {count} numbers or None (one per completion)"
        )
    if len(result) != count:
        raise ValueError(f"returned {len(result)} values for {count} completions")
    return list(result)


def reward_value(value: Any) -> float:
    """A reward value as a finite float (1-element tensors accepted).

    Raises:
        TypeError: Not a real number (``None``, a string, ...).
        ValueError: NaN or infinite.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"returned {type(value).__name__} {value!r}, expected a float")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"returned non-finite {result}")
    return result


def signature_mismatch(
    function: Callable[..., Any], form: str, kwargs: Mapping[str, Any], columns: Sequence[str] = ()
) -> TypeError | None:
    """The `TypeError` a call in ``form`` would raise for its arguments alone (nothing is called), or None.

    Args:
        function: The reward function.
        form: ``"batched"`` or ``"per_completion"``.
        kwargs: The reward's ``kwargs``.
        columns: The dataset columns the batched form passes (all but ``"prompt"``).

    Returns:
        ``inspect.Signature.bind``'s error, e.g. ``missing a required argument: 'solution'``; None when the
        arguments fit or the signature cannot be read.
    """
    signature = _signature(function)
    if signature is None:
        return None
    try:
        if form == "batched":
            names = dict.fromkeys([*BATCHED_ARGUMENTS, *(c for c in columns if c != "prompt"), *kwargs])
            signature.bind(**dict.fromkeys(names, []))
        else:
            signature.bind("completion", {}, **kwargs)
    except TypeError as error:
        return error
    return None
