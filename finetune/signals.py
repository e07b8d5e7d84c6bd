"""Ctrl-C and SIGTERM (what SLURM and Kubernetes send before they preempt a job) during a run: both stop it the same
way, by an exception that the loop turns into a save of the last completed step. Inside `deferred()` (an optimizer
step and the bookkeeping that records it) a signal waits until the block ends, so that the weights, the optimizer
and the progress saved with them always describe the same step."""

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C, reported with its own exit status (143)."""


_depth = 0  # how many `deferred` blocks are open
_pending = None  # the signal that arrived inside one


def _raise_for(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handle(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
    else:
        _raise_for(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise (see `Terminated`) while the block runs; the previous handlers come back after it.
    Only the main thread can set handlers: elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _pending
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _pending = None
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving in the block is raised when the block ends, not in the middle of it."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending is not None:
        signum, _pending = _pending, None
        _raise_for(signum)
