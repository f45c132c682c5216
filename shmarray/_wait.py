"""Waiting: the one home of every wait in shmarray, and of the one timeout rule.

A wait is a deadline (:func:`deadline_of`: None waits forever, 0 tries once,
> 0 seconds on the monotonic clock, after :func:`check_timeout`) and one of
three shapes:

- :func:`poll_until` calls an attempt until it succeeds, napping between
  tries: a :class:`Backoff` by default (timed flock, a payload being
  written), the ring's doorbell nap where there is one (``_ring.ring``), and
  :func:`until_changed`, the doorbell's fallback (naps that end early when
  a watched word changes);
- :func:`acquire_within` takes a ``threading.Lock`` before the deadline;
- :func:`wait_while` waits on a ``threading.Condition`` while a predicate
  holds (readers draining before a writer, threads of one process taking
  turns at a lock).

Every blocking wait here is interruptible by Ctrl-C in the main thread (lock
acquires and ``Condition.wait`` are, on POSIX).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["check_timeout", "deadline_of", "left_until", "Backoff", "poll_until", "until_changed",
           "acquire_within", "wait_while", "FIRST_NAP", "LAST_NAP"]


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """The one timeout rule (locks, rings, the Qt facade): None waits forever, a number >= 0 is seconds.

    0 tries once. Anything else is refused before any waiting: a bool, a
    str or another non-number is a TypeError; a negative number, NaN or
    infinity a ValueError (``threading`` reads -1 as "forever"; here that is
    None, so -1 cannot silently mean "try once").
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be None (wait forever) or a number of seconds >= 0, "
                        f"not {type(timeout).__name__} ({timeout!r})")
    value = float(timeout)
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise ValueError(f"{what} must be None (wait forever) or a finite number of seconds >= 0, "
                         f"not {timeout!r}")
    return value


FIRST_NAP = 5e-5
LAST_NAP = 5e-3


class Backoff:
    """Naps that double from FIRST_NAP to *cap* seconds: a change is seen quickly, and waiting costs little."""

    __slots__ = ("delay", "cap")

    def __init__(self, cap: float = LAST_NAP) -> None:
        self.delay = FIRST_NAP
        self.cap = cap

    def __call__(self, left: float | None) -> None:
        time.sleep(self.delay if left is None else min(self.delay, left))
        self.delay = min(self.delay * 2, self.cap)


def poll_until(attempt: Callable[[], bool], timeout: float | None,
               nap: Callable[[float | None], None] | None = None) -> bool:
    """Call ``attempt()`` until it returns True or *timeout* seconds pass: the one waiting rule.

    None waits forever, 0 tries once, > 0 is a deadline on the monotonic
    clock (timeouts are checked by :func:`check_timeout` first). Between
    attempts ``nap(left)`` sleeps at most *left* seconds (None: no deadline):
    by default a :class:`Backoff`; a waiter with a doorbell sleeps on it.
    """
    if attempt():
        return True
    if timeout is not None and timeout <= 0:
        return False
    deadline = None if timeout is None else time.monotonic() + timeout
    if nap is None:
        nap = Backoff()
    while True:
        left = None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
        nap(left)
        if attempt():
            return True


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic deadline of a checked *timeout* (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def left_until(deadline: float | None) -> float | None:
    """Seconds left before *deadline* (None: no deadline); 0 once it has passed."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def until_changed(read: Callable[[], int | None], seen: int, span: float, backoff: Backoff) -> None:
    """Nap with *backoff* until ``read()`` is no longer *seen* (None: the thing watched went) or *span* passes.

    The doorbell's fallback: where no futex can be had, a waiter polls the
    word a change bumps, each nap short at first, so a change is seen soon
    and a long wait costs little.
    """
    until = time.monotonic() + span
    while True:
        now = read()
        if now is None or now != seen:
            return
        rest = until - time.monotonic()
        if rest <= 0:
            return
        backoff(rest)


def acquire_within(lock: "threading.Lock", timeout: float | None, deadline: float | None) -> bool:
    """Take *lock*: forever for a None *timeout*, once for 0, else before *deadline*."""
    if timeout is None:
        return lock.acquire()
    if timeout <= 0:
        return lock.acquire(False)
    return lock.acquire(True, left_until(deadline) or 0.0)


def wait_while(cond: "threading.Condition", busy: Callable[[], bool], deadline: float | None) -> bool:
    """With *cond* held: wait while ``busy()``; False when *deadline* passed first (None: no deadline)."""
    while busy():
        left = left_until(deadline)
        if left is not None and left <= 0:
            return False
        cond.wait(left)
    return True
