"""Ctrl-C and SIGTERM (what SLURM and Kubernetes send before they preempt a job) during a run: both stop it the same
way, by `Stopped`, which the loop turns into a save of the last completed step.

One process stops at once, except inside `deferred()` (an optimizer step and the bookkeeping that records it), where
a signal waits until the block ends, so that the weights, the optimizer and the progress saved with them always
describe the same step. Several processes must stop at the same point to save together (a save is a collective):
a signal is held (`held()`) until the ranks agree on it at the next log step; a second Ctrl-C stops at once."""

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``). ``together``: every process stops at this same point (one process, or
    several that agreed at a log step), so the last completed step can be saved."""

    def __init__(self, signum: int, together: bool) -> None:
        super().__init__()
        self.signum, self.together = signum, together

    @property
    def terminated(self) -> bool:
        return self.signum == signal.SIGTERM


_hold = False  # several processes: hold a first signal for the ranks to agree on
_depth = 0  # how many `deferred` blocks are open
_pending: Optional[int] = None  # the signal held or deferred


def _handle(signum, frame) -> None:
    global _pending
    if _depth and not _hold:  # one process, in an optimizer step: at its end, however many signals come
        _pending = _pending or signum
    elif _hold and _pending is None:  # several processes: held for the ranks to agree on
        _pending = signum
    else:  # a second signal on several ranks stops at once, saving nothing (a collective save could hang)
        raise Stopped(signum, together=not _hold)


@contextmanager
def stop_signals(processes: int = 1) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run (see `Stopped`) while the block runs; the previous handlers come back after it.
    Only the main thread can set handlers: elsewhere the block changes nothing."""
    global _hold, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _hold, _pending = processes > 1, None
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _hold, _pending = False, None
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """One process: a signal arriving in the block stops the run when the block ends, not in the middle of it."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and not _hold and _pending is not None:
        signum, _pending = _pending, None
        raise Stopped(signum, together=True)


def held() -> int:
    """The signal held for the ranks to agree on (several processes), or 0."""
    return (_pending or 0) if _hold else 0
