"""`RewardProcess`: a reward function's calls in a child process, which a timeout can kill.

A reward with ``process: true`` runs here instead of in the training process. What that buys:

- ``os._exit``, a segmentation fault, ``sys.exit`` or ``KeyboardInterrupt`` inside the function end or fail the
  *child*: the call scores ``on_error`` and is counted, and the next call starts a fresh child. The training
  process cannot be stopped by a reward.
- A call that overruns its ``timeout`` is killed (``SIGKILL``), not abandoned as a thread would be: nothing of
  it keeps running.

Both forms run here: `RewardProcess.call` is one per-completion call, `RewardProcess.invoke` any call (one batched
call with its keyword arguments). An ``async def`` function's calls run one at a time in the child
(``asyncio.run`` per call): isolation, not concurrency.

The cost: a child process per function (started at the first call; it imports the function's module, so its
first call takes that long), and one round trip through a pipe per completion (tens of microseconds). The
completion, the dataset row, ``kwargs`` and the return value must be picklable. The child ignores ``SIGINT``, so
Ctrl-C stops the run in the training process, as without isolation.

The child is this file run as a script (``python reward_process.py``): it imports nothing of lit_entropy
besides the reward function's own module. Messages are length-prefixed pickles on the child's stdin and on a
duplicate of its original stdout; the child's ``sys.stdout`` goes to its stderr, so a reward that prints cannot
break the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from typing import Any, BinaryIO

__all__ = ["RewardCallTimedOut", "RewardProcess", "RewardProcessDied"]

_HEADER = struct.Struct("!Q")
#: Seconds the child may take to import the function's module before its first call counts as a timeout.
START_TIMEOUT = 120.0


class RewardProcessDied(RuntimeError):
    """The child ended (``os._exit``, a crash, a signal) during a call; that call failed."""


class RewardCallTimedOut(RuntimeError):
    """A call overran its timeout; the child was killed."""


def _send(stream: BinaryIO, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:  # an unbuffered pipe may take part of a large message per write
        written = stream.write(data)
        data = data[len(data) if written is None else written :]
    stream.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _receive(stream: BinaryIO) -> Any:
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, size))


class RewardProcess:
    """One reward function served by one child process at a time (restarted after a death or a timeout).

    Args:
        fn: The function's import path, as in `Reward.fn` (the parent has already checked that it resolves).
        name: The function's metric name, for messages.
    """

    def __init__(self, fn: str, name: str) -> None:
        self.fn = fn
        self.name = name
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one is running."""
        return None if self._child is None or self._child.poll() is not None else self._child.pid

    def _start(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: select() on the pipe sees every byte not yet read
            close_fds=True,
        )
        assert child.stdin is not None and child.stdout is not None
        self._child = child
        _send(child.stdin, (list(sys.path), self.fn))
        reply = self._reply(START_TIMEOUT, "importing the function")
        if reply[0] != "ready":
            self.close()
            raise RewardProcessDied(f"the reward's process could not load {self.fn!r}: {reply[1]}")
        return child

    def _reply(self, timeout: float | None, what: str) -> Any:
        child = self._child
        assert child is not None and child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise RewardCallTimedOut(f"{what} did not finish within {timeout}s; its process was killed")
        try:
            return _receive(child.stdout)
        except (EOFError, pickle.UnpicklingError, struct.error):
            code = child.wait()
            self._child = None
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise RewardProcessDied(f"the reward's process {how} during the call") from None

    def call(self, completion: str, example: Any, kwargs: dict[str, Any], timeout: float | None) -> Any:
        """``fn(completion, example, **kwargs)`` in the child (the per-completion form); what it raised is
        raised here.

        Raises:
            RewardCallTimedOut: The call overran ``timeout`` (the child was killed).
            RewardProcessDied: The child ended during the call, or could not import the function.
            Exception: What the function raised (its type when it is importable here, else ``RuntimeError``).
        """
        return self.invoke((completion, example), kwargs, timeout)

    def invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """``fn(*args, **kwargs)`` in the child, e.g. one call of the batched form with ``args=()``; an ``async
        def`` function's coroutine is run to its end there (``asyncio.run``). Raises as `call` does."""
        child = self._child if self._child is not None and self._child.poll() is None else self._start()
        assert child.stdin is not None
        try:
            _send(child.stdin, (tuple(args), kwargs))
        except (BrokenPipeError, OSError):
            self._child = None
            raise RewardProcessDied("the reward's process had exited before the call") from None
        reply = self._reply(timeout, "the call")
        if reply[0] == "ok":
            return reply[1]
        _, error = reply
        if not isinstance(
            error, Exception
        ):  # sys.exit, KeyboardInterrupt: they ended only the call, in the child
            raise RuntimeError(f"{type(error).__name__}({error}) raised in the reward's process") from None
        raise error

    def close(self) -> None:
        """Kill the child, if one is running."""
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.kill()
        with contextlib.suppress(Exception):
            child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "name": self.name, "_child": None}  # a copy starts its own child

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _resolve(path: str) -> Any:
    module_name, _, attr_path = path.partition(":") if ":" in path else path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RuntimeError`` with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - whatever makes it unpicklable
        return RuntimeError(f"{type(error).__name__}: {error}")


async def _result_of(awaitable: Any) -> Any:
    return await awaitable


def _serve() -> None:
    """The child's loop: load the function, then answer calls until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the function's prints go to stderr, never into the protocol
    requests = sys.stdin.buffer
    sys.path[:], path = _receive(requests)
    try:
        function = _resolve(path)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        _send(protocol, ("error", f"{type(error).__name__}: {error}"))
        return
    _send(protocol, ("ready", None))
    while True:
        try:
            args, kwargs = _receive(requests)
        except EOFError:
            return
        try:
            value = function(*args, **kwargs)
            if inspect.isawaitable(value):  # an async def reward: its calls run one at a time here
                value = asyncio.run(_result_of(value))
            reply: tuple[str, Any] = ("ok", value)
            _send(protocol, reply)
        except BaseException as error:  # noqa: BLE001 - sys.exit and KeyboardInterrupt included: one failed call
            _send(protocol, ("error", _portable(error)))


if __name__ == "__main__":
    _serve()
