"""The locks: the segment lock (exclusive and shared, timeouts, survives a holder's death), the
byte-range locks a payload layer keeps per item, and the one rule for timeouts and waiting.

The segment lock is ``flock(2)`` on an open file description of the
segment's file that belongs to one ``Segment`` object (and the views built
on it), opened on its first lock: the kernel excludes the objects of one
process from each other as it excludes processes (Qt's per-object lock),
counts the readers of the shared mode, and releases a dead holder's lock.
No in-process gate sits in front of it, so a round trip is one ``flock``
pair plus a few attribute reads, in one Python call each way
(:func:`segment_lock` and :func:`segment_unlock` are ``Segment.lock`` and
``Segment.unlock``): the lock group's aim is 1.3x of the fastest
kernel-released lock. The attachment's :class:`LockGate` only
carries what the objects of one attachment share: the holder mark and the
fork reset. A holder mark in the segment's control block (the holder's pid,
written after acquiring exclusively and cleared before releasing) tells the
next acquirer that the previous exclusive holder died while holding it
(its place in the block: ``_control.MARK_WORD``).

Byte-range locks (:class:`ByteLocks`) are OFD locks on single bytes of the
segment's file, one per item a payload layer hands out (the ring's slots,
offsets in ``_ring.layout``), through a description owned by one Segment
object: the kernel drops them when the holder dies, and a holder that
vanished is detected by asking, not by taking.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, Protocol

from ._control import MARK_WORD
from ._errors import LockError
from ._os import backend
from ._os._linux import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, flock
from ._wait import check_timeout, deadline_of, left_until, poll_until, wait_while

__all__ = ["LockGate", "SegmentLock", "SegmentLocked", "Holds", "Guard", "ByteLocks", "segment_lock",
           "segment_unlock"]

_MARK = MARK_WORD
_OPENING = threading.Lock()  # taken only while a lock opens its description


class LockGate:
    """What the Segment objects of one attachment share about the lock: the holder mark, the fork reset.

    *fd* is the attachment's descriptor (each object's lock opens a
    description of its own from it); *marks* is a ``'Q'`` view of the
    control block (None for a foreign segment) whose word MARK_WORD holds
    the exclusive holder's pid; *write_mark*, for a control block mapped
    read-only, writes that word through the descriptor instead.
    """

    __slots__ = ("fd", "marks", "peek", "write_mark", "pid", "locks")

    def __init__(self, fd: int, marks: memoryview | None, pid: int,
                 write_mark: "Callable[[int], None] | None" = None) -> None:
        self.fd = fd
        self.marks = marks if marks is not None and not marks.readonly else None
        self.peek = marks
        self.write_mark = write_mark if self.marks is None and marks is not None else None
        self.pid = pid
        self.locks: weakref.WeakSet[SegmentLock] = weakref.WeakSet()

    @property
    def owner(self) -> SegmentLock | None:
        """The object's lock that holds it exclusively in this process, if any (asked at close, not kept up to date by the hot path)."""
        for lk in list(self.locks):
            if lk._held == 2:
                return lk
        return None

    def set_mark(self, value: int) -> None:
        if self.marks is not None:
            self.marks[_MARK] = value
        elif self.write_mark is not None:
            self.write_mark(value)

    def mark(self) -> int:
        peek = self.peek
        return peek[_MARK] if peek is not None else 0

    def after_fork(self, pid: int) -> None:
        """In a forked child: nobody here holds the lock, and no object has a description of its own yet.

        The child's copies of the parent's descriptions are closed, never
        unlocked (an unlock through a copy would release the parent's lock);
        each object opens a new one on its next lock.
        """
        self.pid = pid
        for lk in list(self.locks):
            lk._forget(pid)


class SegmentLock:
    """The lock of one Segment object (and the views built on it): ``flock`` on a description of its own."""

    __slots__ = ("_gate", "_held", "_seen", "_fd", "_marks", "_pid", "holds", "error_set", "__weakref__")

    def __init__(self, gate: LockGate) -> None:
        self._gate = gate
        self._held = 0  # 0 free, 1 shared, 2 exclusive
        self._seen = 0  # the holder mark found by the last acquisition: a dead holder's pid, or 0
        self._fd = -1  # this object's description, opened on the first lock (and again after a fork)
        # Bound once for the fast path: a writable view of the control block, or None.
        self._marks = gate.marks
        self._pid = gate.pid
        self.holds: Holds | None = None  # the guard rule, made on first SharedArray.lock()
        # True while the Segment's Qt error state may be set (Segment._fail sets it), so the
        # fast path reads a slot of its own instead of the Segment's: a success clears the state.
        self.error_set = True
        gate.locks.add(self)

    @property
    def recovered(self) -> bool:
        """True when the last acquisition found that the previous exclusive holder had died holding it."""
        return self._seen != 0

    @property
    def held(self) -> str | None:
        """'exclusive', 'shared' or None."""
        return (None, "shared", "exclusive")[self._held]

    def _open(self) -> int:
        fd = self._fd
        if fd < 0:
            # Once per object (and per fork): two threads locking it first at once
            # must not open two descriptions, or one would wait for the other forever.
            with _OPENING:
                fd = self._fd
                if fd < 0:
                    # Read-only is enough for flock, and every attacher may read the file.
                    fd = self._fd = backend.reopen(self._gate.fd, False)
        return fd

    def _forget(self, pid: int) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            backend.close(fd)
        self._held = 0
        self._pid = pid

    def close(self) -> None:
        """This object is done: release what it holds, close its description."""
        if self._pid != backend.getpid():
            self._fd = -1  # a forked child that missed the reset: the number is not ours to close
            self._held = 0
            return
        if self._held:
            self.release()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            backend.close(fd)

    def acquire(self, timeout: float | None = None, shared: bool = False) -> bool:
        """Take the lock; True when held, False when *timeout* ran out."""
        if timeout is None and not shared and not self._held:
            # The common case first, with nothing looked up twice: a round trip
            # within 1.3x of a bare flock pair is an aim of the project.
            fd = self._fd
            flock(fd if fd >= 0 else self._open(), LOCK_EX)
            marks = self._marks
            if marks is not None:
                self._seen = marks[_MARK]
                marks[_MARK] = self._pid
            else:
                self._mark_taken()
            self._held = 2
            return True
        timeout = check_timeout(timeout)
        if self._held:
            if self._held == 2 or shared:
                return True
            raise LockError(
                "this object holds the shared lock; unlock() it before asking for the exclusive lock"
            )
        if not self._take(LOCK_SH if shared else LOCK_EX, timeout):
            return False
        if shared:
            self._held = 1
            g = self._gate
            mark = g.mark()
            if mark:
                # No live exclusive holder can coexist with our shared
                # lock: the mark is a dead holder's. Report it (once, where
                # this attachment may clear it).
                g.set_mark(0)
            self._seen = mark
            return True
        self._mark_taken()
        self._held = 2
        return True

    def _mark_taken(self) -> None:
        g = self._gate
        self._seen = g.mark()
        g.set_mark(self._pid)

    def _take(self, op: int, timeout: float | None) -> bool:
        fd = self._open()
        if timeout is None:
            # Blocking flock: EINTR runs signal handlers, so Ctrl-C interrupts it.
            flock(fd, op)
            return True
        nb = op | LOCK_NB

        def attempt() -> bool:
            try:
                flock(fd, nb)
            except BlockingIOError:
                return False
            return True

        return poll_until(attempt, timeout)

    def release(self) -> bool:
        """Release the lock; False when this object did not hold it."""
        held = self._held
        if held == 2:
            self._held = 0
            marks = self._marks
            if marks is not None:
                marks[_MARK] = 0
            else:
                self._gate.set_mark(0)
            flock(self._fd, LOCK_UN)
            return True
        if held:
            self._held = 0
            flock(self._fd, LOCK_UN)
            return True
        return False


class ByteLocks:
    """Byte-range locks on one Segment object's own description: one per item a payload layer hands out.

    *description* returns the fd to lock through (``Segment._lock_fd``: one
    description per Segment object, opened on first use and again after a
    fork, so two holders in one process exclude each other too). Offsets are
    the caller's (see ``_ring.layout``); they must stay clear of the bytes
    the attachment layer locks (``_os``: below 2**40 + 2**22).
    """

    __slots__ = ("_description",)

    def __init__(self, description: Callable[[], int]) -> None:
        self._description = description

    def fd(self) -> int:
        """The description, for a loop over many bytes under one ring operation (asked for once, not per byte)."""
        return self._description()

    def try_take(self, at: int, fd: int | None = None) -> bool:
        """Take byte *at* exclusively; False (at once) when another description holds it."""
        return backend.ofd_lock(self._description() if fd is None else fd, at, exclusive=True, wait=False)

    def take_shared(self, at: int) -> None:
        """Hold byte *at* shared (waits out an exclusive holder)."""
        backend.ofd_lock(self._description(), at, exclusive=False, wait=True)

    def drop(self, at: int) -> None:
        """Let go of byte *at*."""
        backend.ofd_unlock(self._description(), at)

    def held_elsewhere(self, at: int, fd: int | None = None) -> bool:
        """True while another description (a live holder, in any process) holds byte *at*."""
        return backend.ofd_held_elsewhere(self._description() if fd is None else fd, at)


class Guard:
    """What ``lock()`` returns: the lock is already held; ``with`` (or :meth:`release`) lets go of it.

    One hold of one lock, taken by one call: releasing it twice, or after
    ``unlock()`` released it, is a LockError and never lets go of another
    hold. Dropping the guard does not release (a bare ``a.lock()``
    statement holds the lock until ``a.unlock()``, as ``threading.Lock.acquire``).
    """

    __slots__ = ("_holds", "_value", "_thread", "_open", "shared")

    def __init__(self, holds: Holds, value: object, thread: int, shared: bool) -> None:
        self._holds = holds
        self._value = value
        self._thread = thread
        self._open = True
        self.shared = shared

    @property
    def held(self) -> bool:
        """True until this hold is released (by the guard, ``with`` or ``unlock()``)."""
        return self._open

    def release(self) -> None:
        """Let go of this hold (the lock itself goes when the last hold on it does)."""
        self._holds.release(self)

    def __enter__(self) -> Any:
        if not self._open:
            raise LockError("this lock guard was released already; call lock() again for a new hold")
        return self._value

    def __exit__(self, *exc: object) -> None:
        self._holds.release(self)

    def __repr__(self) -> str:
        state = ("shared" if self.shared else "exclusive") if self._open else "released"
        return f"<shmarray lock guard {state}>"


class Holds:
    """The guard rule for one lock object: ``lock()`` takes the lock when called and returns a :class:`Guard`.

    Among this process's threads it is a re-entrant readers-writer lock over
    the object's :class:`SegmentLock` (which is per object, as in Qt, and
    would let a second thread of the same object straight in): a thread that
    holds it may lock again (each hold released once), readers share, and
    a writer waits for the other threads' holds to go. The lock between
    processes is taken by the first hold and dropped with the last.
    """

    __slots__ = ("_lock", "_cond", "_stacks", "_writer", "_busy", "_borrowed", "_pid")

    def __init__(self, lock: SegmentLock) -> None:
        self._lock = lock
        self._fresh()

    def _fresh(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._stacks: dict[int, list[Guard]] = {}  # thread -> its open guards, latest last
        self._writer: int | None = None  # the thread holding exclusively, if any
        self._busy = False  # a thread is taking or dropping the lock between processes
        self._borrowed = False  # the lock was held through Segment.lock() when the first guard came
        self._pid = os.getpid()

    def acquire(self, value: object, timeout: float | None, shared: bool, label: str) -> Guard:
        """Take a hold for the calling thread; raises LockError when *timeout* seconds run out."""
        timeout = check_timeout(timeout)
        if self._pid != os.getpid():
            self._fresh()  # a forked child: the parent's threads and holds are not here
        me = threading.get_ident()
        deadline = deadline_of(timeout)
        cond = self._cond
        with cond:
            mine = self._stacks.get(me)
            if mine:
                if self._writer == me or shared:
                    return self._push(value, me, mine[-1].shared and shared)
                raise LockError(f"{label}: this thread holds the shared lock; release it before asking "
                                "for the exclusive one (an upgrade could deadlock two readers)")
            def others_hold() -> bool:
                return self._busy or (bool(self._stacks) and not (shared and self._writer is None))

            if not wait_while(cond, others_hold, deadline):
                raise LockError(f"{label}: timed out after {timeout} s (another thread of this "
                                "process holds the lock)")
            if self._stacks:
                return self._push(value, me, True)  # join the other threads' shared hold
            self._busy = True  # nobody in this process holds it: take it between processes
        lk = self._lock
        took = False
        # Held through Segment.lock() already: the guards borrow that hold and leave it held.
        borrowed = lk._held != 0
        try:
            if borrowed and lk._held == 1 and not shared:
                raise LockError(f"{label}: the shared lock is held through Segment.lock(shared=True); "
                                "unlock() it before asking for the exclusive one")
            took = lk.acquire(left_until(deadline), shared)
        finally:
            with cond:
                self._busy = False
                cond.notify_all()
                if took:
                    self._borrowed = borrowed
                    if lk._held == 2:
                        self._writer = me
                    guard = self._push(value, me, shared)
        if not took:
            raise LockError(f"{label}: timed out after {timeout} s waiting for the lock")
        return guard

    def _push(self, value: object, me: int, shared: bool) -> Guard:
        guard = Guard(self, value, me, shared)
        self._stacks.setdefault(me, []).append(guard)
        return guard

    def release(self, guard: Guard | None = None) -> None:
        """Close *guard* (None: the calling thread's latest hold); the last hold drops the lock."""
        cond = self._cond
        with cond:
            if guard is None:
                me = threading.get_ident()
                mine = self._stacks.get(me)
                if not mine:
                    if self._stacks:
                        raise LockError("unlock(): another thread of this process holds this lock; the thread "
                                        "that took it releases it (or its guard does)")
                    if self._lock._held and self._pid == os.getpid():
                        self._lock.release()  # held through Segment.lock(): this object's own hold
                        return
                    raise LockError("unlock(): the lock is not held (released already, or never taken)")
                guard = mine[-1]
            elif self._pid != os.getpid():
                raise LockError("this lock guard was taken in the parent process; a forked child does "
                                "not hold its parent's lock")
            elif not guard._open:
                raise LockError("this lock guard was released already (a second release would let go "
                                "of another hold)")
            guard._open = False
            stack = self._stacks[guard._thread]
            stack.remove(guard)
            if stack:
                return
            del self._stacks[guard._thread]
            if self._writer == guard._thread:
                self._writer = None
            if self._stacks:
                return
            if not self._borrowed:
                self._lock.release()
            self._borrowed = False
            cond.notify_all()


class _LockOwner(Protocol):
    """What ``SegmentLocked``, ``segment_lock`` and ``segment_unlock`` ask of the Segment they serve
    (declared here: the lock sits below it)."""

    _lk: SegmentLock | None
    _error: Any

    @property
    def key(self) -> str | None: ...
    def _label(self) -> str | None: ...
    def _ok(self) -> None: ...
    def _lock_slow(self, timeout: float | None, shared: bool) -> bool: ...
    def lock(self, timeout: float | None = ..., *, shared: bool = ...) -> bool: ...
    def unlock(self) -> bool: ...


def segment_lock(self: _LockOwner, timeout: float | None = None, *, shared: bool = False) -> bool:
    """Take the segment lock.

    Locking again through the object that holds the lock returns True at
    once. Each Segment object is a lock of its own, also against other
    objects of the same segment in this process (views share their root's).
    When the previous exclusive holder died holding it, the lock is taken
    all the same and ``lock_recovered`` is True.

    Parameters
    ----------
    timeout : float or None, optional
        Seconds to wait: None (the default) waits forever (Ctrl-C
        interrupts), 0 tries once.
    shared : bool, optional
        Take it as a reader (many at once) instead of exclusively.

    Returns
    -------
    bool
        True when held, False when *timeout* ran out (``error`` is then
        LockError, as in Qt).

    Raises
    ------
    LockError
        When the segment is not attached or is foreign (no lock), or this
        object holds the shared lock and asks for the exclusive one.
    """
    # ``Segment.lock`` itself: the common case (exclusive, no timeout, a
    # description open, a writable mark) is one Python call around one flock,
    # which keeps the round trip near a bare flock pair (the lock group's aim,
    # 1.3x); everything else is Segment._lock_slow -> SegmentLock.acquire.
    lk = self._lk
    if lk is not None and timeout is None and not shared and not lk._held:
        fd = lk._fd
        marks = lk._marks
        if fd >= 0 and marks is not None:
            flock(fd, LOCK_EX)
            lk._seen = marks[_MARK]
            marks[_MARK] = lk._pid
            lk._held = 2
            if lk.error_set:
                lk.error_set = False
                self._ok()
            return True
    return self._lock_slow(timeout, shared)


def segment_unlock(self: _LockOwner) -> bool:
    """Release the segment lock.

    Returns
    -------
    bool
        False when this object did not hold it.
    """
    lk = self._lk
    if lk is None:
        return False
    marks = lk._marks
    if lk._held == 2 and marks is not None:  # ``Segment.unlock``'s common case, as in segment_lock
        lk._held = 0
        marks[_MARK] = 0  # cleared before releasing: a mark left behind is a dead holder's
        flock(lk._fd, LOCK_UN)
        return True
    return lk.release()


class SegmentLocked:
    """``with seg.locked():`` -- raises LockError on timeout; nests without releasing early.

    Each entry pushes whether it took the lock, each exit pops: only the
    entry that took it releases it.
    """

    __slots__ = ("_seg", "_timeout", "_shared", "_took")

    def __init__(self, seg: _LockOwner, timeout: float | None, shared: bool) -> None:
        # A weak reference: the Segment caches one of these, and a cycle would
        # delay its detach (on the last reference going) until a gc pass.
        self._seg = weakref.ref(seg)
        self._timeout = timeout
        self._shared = shared
        self._took: list[bool] = []

    def __enter__(self) -> Any:
        seg = self._seg()
        if seg is None:  # pragma: no cover - the caller holds the Segment
            raise LockError("the segment of this lock context is gone")
        lk = seg._lk
        took = lk is None or not lk._held
        if not seg.lock(self._timeout, shared=self._shared):
            raise LockError(
                f"timed out after {self._timeout} s waiting for the lock of segment {seg._label()!r}",
                seg.key,
            )
        self._took.append(took)
        return seg

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._took.pop():
            seg = self._seg()
            if seg is not None:
                seg.unlock()
