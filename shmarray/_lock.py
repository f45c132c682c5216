"""The segment lock: exclusive and shared, timeouts, survives a holder's death.

The lock is ``flock(2)`` on the attachment's own open file description, so
it is per attachment (per ``Segment`` object, as in Qt: two objects in one
process exclude each other) and the kernel releases it when its holder dies.
A holder mark in the segment's control block (the holder's pid, written after
acquiring exclusively and cleared before releasing) tells the next acquirer
that the previous exclusive holder died while holding it.
"""

from __future__ import annotations

import time

from ._errors import LockError
from ._os._linux import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, flock

__all__ = ["SegmentLock", "poll_until", "MARK_WORD"]

MARK_WORD = 4  # byte 32 of the control block, as a 'Q' index
_MARK = MARK_WORD
_EX_NB = LOCK_EX | LOCK_NB
_SH_NB = LOCK_SH | LOCK_NB


def poll_until(attempt: "object", timeout: float | None) -> bool:
    """Call ``attempt()`` until it returns True or *timeout* seconds pass.

    One timeout rule everywhere: None waits forever, 0 tries once, > 0 is a
    deadline on the monotonic clock. Sleeps back off from 50 us to 5 ms so a
    release is noticed quickly without spinning.
    """
    if attempt():  # type: ignore[operator]
        return True
    if timeout is not None and timeout <= 0:
        return False
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 5e-5
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        if attempt():  # type: ignore[operator]
            return True
        delay = min(delay * 2, 5e-3)


class SegmentLock:
    """The data lock of one attachment.

    *fd* is the attachment's lock descriptor; *marks* is a ``'Q'`` view of
    the control block (None for a foreign segment, read-only when this
    attachment may not write it) whose word MARK_WORD holds the exclusive
    holder's pid.
    """

    __slots__ = ("_fd", "_marks", "_peek", "_pid", "_held", "recovered")

    def __init__(self, fd: int, marks: memoryview | None, pid: int) -> None:
        self._fd = fd
        self._marks = marks if marks is not None and not marks.readonly else None
        self._peek = marks
        self._pid = pid
        self._held = 0  # 0 free, 1 shared, 2 exclusive
        self.recovered = False

    @property
    def held(self) -> str | None:
        """'exclusive', 'shared' or None."""
        return (None, "shared", "exclusive")[self._held]

    def acquire(self, timeout: float | None = None, shared: bool = False) -> bool:
        """Take the lock; True when held, False when *timeout* ran out."""
        if self._held:
            if self._held == 2 or shared:
                return True
            raise LockError(
                "this object holds the shared lock; unlock() it before asking for the exclusive lock"
            )
        if timeout is None:
            # Blocking flock: EINTR runs signal handlers, so Ctrl-C interrupts it.
            flock(self._fd, LOCK_SH if shared else LOCK_EX)
        elif not self._try(timeout, shared):
            return False
        marks = self._marks
        if shared:
            self._held = 1
            if marks is not None:
                if marks[_MARK]:
                    # No live exclusive holder can coexist with our shared
                    # lock: the mark is a dead holder's. Report it once.
                    marks[_MARK] = 0
                    self.recovered = True
                else:
                    self.recovered = False
            elif self._peek is not None:
                self.recovered = self._peek[_MARK] != 0
        else:
            self._held = 2
            if marks is not None:
                self.recovered = marks[_MARK] != 0
                marks[_MARK] = self._pid
            elif self._peek is not None:
                self.recovered = self._peek[_MARK] != 0
        return True

    def _try(self, timeout: float, shared: bool) -> bool:
        fd = self._fd
        op = _SH_NB if shared else _EX_NB

        def attempt() -> bool:
            try:
                flock(fd, op)
            except BlockingIOError:
                return False
            return True

        return poll_until(attempt, timeout)

    def release(self) -> bool:
        """Release the lock; False when this attachment did not hold it."""
        held = self._held
        if not held:
            return False
        if held == 2 and self._marks is not None:
            self._marks[_MARK] = 0
        self._held = 0
        flock(self._fd, LOCK_UN)
        return True

    def forget(self, fd: int, pid: int) -> None:
        """After fork: use the child's own descriptor; the parent keeps its lock."""
        self._fd = fd
        self._pid = pid
        self._held = 0
        self.recovered = False
