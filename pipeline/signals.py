"""Ctrl-C and SIGTERM become exceptions in the main thread, except while a store write is under
way: there they wait until it returns. (Blocking the signal with a mask does not do it: the kernel
hands it to another thread, and Python still runs the handler in the main thread mid-write.)"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from .errors import Terminated

_state = {"held": 0, "pending": None}


def _raise(signum: int):
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    if _state["held"]:
        _state["pending"] = signum
        return
    _raise(signum)


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
    if not _state["held"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        _raise(signum)
