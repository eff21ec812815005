"""Reward functions for tests/test_reward_process.py, run in a child process; stdlib imports only (fast start)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def misbehaving_reward(completion: str, example: dict[str, Any], pid_file: str | None = None) -> float:
    """``len(completion)``, except: ``exit`` -> ``os._exit(0)``, ``sysexit`` -> ``sys.exit(3)``, ``interrupt`` ->
    ``KeyboardInterrupt``, ``segfault`` -> ``SIGSEGV`` to itself, ``hang`` -> sleeps (after writing its pid),
    ``print`` -> prints to stdout first."""
    if completion == "exit":
        os._exit(0)
    if completion == "sysexit":
        sys.exit(3)
    if completion == "interrupt":
        raise KeyboardInterrupt
    if completion == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if completion == "hang":
        if pid_file:
            Path(pid_file).write_text(str(os.getpid()))
        time.sleep(60)
    if completion == "print":
        print("a reward that prints to stdout")
    if completion == "raise":
        raise ValueError(f"no answer in {completion!r} for {example['answer']!r}")
    return float(len(completion))


def pid_reward(completion: str, example: dict[str, Any]) -> float:
    return float(os.getpid())


_calls = 0


def exits_every_third_call(completion: str, example: dict[str, Any]) -> float:
    """``os._exit(7)`` on every third call of a child's life (the child restarts, the count with it)."""
    global _calls
    _calls += 1
    if _calls % 3 == 0:
        os._exit(7)
    return sum(map(ord, completion)) / (128.0 * max(len(completion), 1))


def batched_lengths(completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float | None]:
    """TRL's batched form: ``len(text)``, ``None`` where the row's answer is None; ``os._exit(0)`` on ``exit``."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    if "exit" in texts:
        os._exit(0)
    return [None if a is None else float(len(text)) for text, a in zip(texts, answer)]


async def async_lengths(completion: str, example: dict[str, Any]) -> float:
    """An ``async def`` per-completion reward: ``len(completion)``."""
    return float(len(completion))
