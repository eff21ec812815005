"""`Reward`: one reward function in a config, and the import of the function it names.

Safety: ``fn`` is imported with ``importlib.import_module``, which executes the module's top-level code (and
its imports) with the trainer's privileges; the function then sees every completion and dataset row. Only name
code you trust.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lit_entropy.errors import ConfigError

__all__ = ["Reward", "RewardForm", "resolve_reward_function"]

RewardForm = Literal["auto", "batched", "per_completion"]
"""How a reward function is called: ``per_completion`` ``fn(completion, example, **kwargs) -> float``, ``batched``
(TRL's form) ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``, or ``auto``: told
from the signature (`lit_entropy.reward_forms.detect_form`)."""


@dataclass
class Reward:
    """One reward function in a config: import path, weight, and how it is called.

    Attributes:
        fn: Import path, ``"package.module.function"`` or ``"package.module:function"``.
        weight: Multiplier of this function's values in the total reward.
        name: Metric name; default: the function's ``__name__``.
        kwargs: Extra keyword arguments passed on every call.
        timeout: Seconds one call (one completion) may take; a slower call scores ``on_error`` and is counted
            as a timeout. ``None`` (default): no limit, the function runs in the training thread. With a
            timeout it runs in a daemon worker thread, so it must not rely on ``signal.alarm`` (main thread
            only); a call that never returns is abandoned, not killed (see `lit_entropy.reward_scorer`).
        process: Run the calls in a child process (`lit_entropy.reward_process`): a function that calls
            ``os._exit``, crashes or raises ``KeyboardInterrupt`` fails that call only (scored ``on_error`` and
            counted), and a call past ``timeout`` is killed instead of abandoned. For verifiers you do not
            fully trust (code execution, external tools). Rows, ``kwargs`` and results must be picklable.
        form: ``"per_completion"``: called once per completion as ``fn(completion: str, example: dict,
            **kwargs) -> float``. ``"batched"`` (TRL's ``GRPOTrainer`` form): called once per scoring call as
            ``fn(prompts=..., completions=..., completion_ids=..., **columns, **kwargs) -> list[float | None]``,
            every dataset column passed as a list with one entry per completion; ``None`` means the function
            does not apply to that completion. ``"auto"`` (default): batched when the function's first
            parameter is named ``prompts`` or ``completions`` and it can receive ``completions``, per completion
            otherwise (see `lit_entropy.reward_forms.detect_form`). ``async def`` functions of either form run concurrently
            (`lit_entropy.reward_scorer`). With ``timeout``, a batched call has ``timeout`` seconds for the
            whole batch.
    """

    fn: str
    weight: float = 1.0
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    process: bool = False
    form: RewardForm = "auto"


def resolve_reward_function(path: str) -> Callable[..., Any]:
    """Imports the callable named by ``"package.module.function"`` or ``"package.module:attr.attr"``.

    Raises:
        ConfigError: Naming ``path`` when it is malformed, the module cannot be imported, the attribute
            is missing, or the object is not callable.
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"reward fn must be an import path like 'package.module.function', got {path!r}")
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ConfigError(f"reward fn {path!r} is not an import path like 'package.module.function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward fn {path!r}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module's own top-level code failed (SyntaxError, a missing file, ...)
        raise ConfigError(
            f"reward fn {path!r}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"reward fn {path!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"reward fn {path!r} is not callable (got {type(obj).__name__})")
    return obj
