"""Warm mappings: a process keeps its idle mappings of segments for the next hand-off.

Mapping a file afresh costs a page-table fault per 4 KiB page on first
access and a page-table teardown at unmap (together more than the sum a
worker computes over it: benchmarks/results/notes.md, the ``handoff`` group). When the pages a
mapping covers are recycled for the next segment (``kept_files``), the same
mapping of the same file already has every page-table entry: a worker that
keeps it attaches the next array without a single fault.

Rules that keep this safe:

- Every mapping of a segment holds a shared OFD lock on ``MAPPED_BYTE``
  through the open file description it was made from (the OS layer). A
  file is recycled (rewritten for another segment) or truncated only when
  no description holds that byte.
- A mapping becomes *idle* only when no buffer of it is exported anywhere
  in this process: nothing but this module references the ``mmap`` object
  (every memoryview, ndarray and Arrow buffer of it holds a reference, so
  the reference count says so exactly). Only then is its lock dropped and
  the mapping kept; no user object can reach an idle mapping, so nothing a
  user holds can see the bytes of the segment that reuses the file.
- An idle mapping is taken again only for the same file (device and inode),
  offset and protection, once the file covers it; it is then locked again
  before any view is built on it.

The budget (``SHMARRAY_REUSE_BYTES``, else a quarter of the file system, at
most 4 GiB) bounds, per file system a process uses for segments, the bytes
of idle mappings kept here and the bytes of recycled files it keeps there
(``kept_files``).
"""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Callable

from .._os import backend

__all__ = ["Region", "find_idle", "map_region", "release", "forget_file", "budget", "parse_bytes", "drop_idle"]

# Below this a fresh segment costs well under a millisecond: not worth keeping.
MIN_KEEP = 1 << 20
# Idle mappings kept at most (each holds one descriptor).
MAX_IDLE = 16
_DEFAULT_CAP = 4 << 30

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'0', '1048576', '512M', '4G', '1.5GiB' -> bytes; ValueError otherwise."""
    t = text.strip().lower().replace("_", "")
    for tail in ("ib", "b"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[: -len(tail)]
            break
    unit = t[-1:] if t[-1:] in _SUFFIXES and t[-1:] != "" and not t[-1:].isdigit() else ""
    number = t[: -1] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(
            f"SHMARRAY_REUSE_BYTES={text!r} is not a size; use bytes (1073741824) or a suffix "
            "(512M, 4G), or 0 to turn reuse off") from None
    if value < 0 or value != value:
        raise ValueError(f"SHMARRAY_REUSE_BYTES={text!r} must be >= 0 (0 turns reuse off)")
    return int(value * _SUFFIXES[unit])


# set_budget()'s value or SHMARRAY_REUSE_BYTES (None: neither), read once.
_fixed: int | None = None
_fixed_read = False
_sized: dict[int, int] = {}  # st_dev -> min(4 GiB, 1/4 of that file system)
_devices: dict[str | None, int] = {}  # segment directory -> st_dev


def _budget_of(dev: int, total: Callable[[], int]) -> int:
    """The budget for the file system *dev*; *total* gives its size when it is not known yet."""
    global _fixed, _fixed_read
    if not _fixed_read:
        raw = os.environ.get("SHMARRAY_REUSE_BYTES")
        _fixed = parse_bytes(raw) if raw is not None and raw.strip() else None
        _fixed_read = True
    if _fixed is not None:
        return _fixed
    got = _sized.get(dev)
    if got is None:
        got = _sized[dev] = min(_DEFAULT_CAP, total() // 4)
    return got


def budget(directory: str | None = None) -> int:
    """The bytes this process may keep for reuse in a segment directory (None: the default one).

    ``SHMARRAY_REUSE_BYTES``, else min(4 GiB, 1/4 of the directory's file system).
    """
    dev = _devices.get(directory)
    if dev is None:
        dev = _devices[directory] = backend.host_device(directory)
    return _budget_of(dev, lambda: backend.total_bytes(directory))


def set_budget(value: int | None) -> None:
    """Set the budget for this process (None: read the environment again). For tests and benchmarks.

    What is kept already stays (a budget of 0 keeps nothing new and reuses
    nothing); ``kept_files.release_all()`` frees it.
    """
    global _fixed, _fixed_read
    _fixed = value
    _fixed_read = value is not None


class Region:
    """One mapping of a segment file and the description that marks it mapped."""

    __slots__ = ("mm", "fd", "fd_in_mm", "dev", "ino", "offset", "length", "writable", "warm", "own",
                 "waiter")

    def __init__(self, mm: Any, fd: int, dev: int, ino: int, offset: int, length: int,
                 writable: bool, warm: bool, fd_in_mm: bool = False) -> None:
        self.mm = mm
        self.fd = fd
        # True when *fd* is the mapping's own duplicate (one descriptor per
        # mapping, see backend.map_marked): it goes when the mapping does and
        # is never closed here.
        self.fd_in_mm = fd_in_mm
        self.dev = dev
        self.ino = ino
        self.offset = offset
        self.length = length
        self.writable = writable
        # True when taken from the idle list: its pages are already mapped.
        self.warm = warm
        # True while the mapping's own duplicate fd is of *fd*'s description
        # (so the mark lives as long as the mapping); False after a fork.
        self.own = True
        self.waiter: Any = None  # a weak reference to the root ndarray, while its death is awaited


_idle: list[Region] = []
# Mappings re-marked in a forked child that were still in use when their
# attachment went: their mark is on a description the mapping does not
# hold, so it is kept (with the mapping) until they are seen idle.
_busy: list[Region] = []


def _discard(r: Region) -> None:
    backend.unmap_without_recency(r.mm)
    closed = backend.close_mapping(r.mm)
    if not r.fd_in_mm:
        backend.close(r.fd)
    elif not closed:  # pragma: no cover - idle mappings export no buffer
        backend.drop_mapped(r.fd)


def find_idle(dev: int, ino: int, offset: int, length: int, writable: bool) -> Region | None:
    """An idle mapping of this file, offset and protection at least *length* long, marked mapped again."""
    for i in range(len(_idle) - 1, -1, -1):
        r = _idle[i]
        if r.ino == ino and r.dev == dev and r.offset == offset and r.writable == writable and r.length >= length:
            del _idle[i]
            try:
                # A file shrunk under an idle mapping would fault past its end.
                if backend.size_of(r.fd) < r.offset + r.length:
                    _discard(r)
                    return None
                backend.hold_mapped(r.fd)
            except OSError:  # pragma: no cover - the fd is ours
                _discard(r)
                return None
            r.warm = True
            return r
    return None


def map_region(map_fd: int, dev: int, ino: int, offset: int, length: int, writable: bool) -> Region:
    """A mapping of bytes [offset, offset + length) of the file open as *map_fd*, marked mapped.

    *map_fd* is a description of its own (no attachment locks on it); it is
    kept by the region or closed here, whatever happens. An idle mapping of
    the same file, offset and protection that is at least as long is taken
    instead of a new one.
    """
    if _idle:
        r = find_idle(dev, ino, offset, length, writable)
        if r is not None:
            backend.close(map_fd)
            return r
    try:
        mm, fd, in_mm = backend.map_marked(map_fd, offset, length, writable)
    except BaseException:
        backend.close(map_fd)
        raise
    return Region(mm, fd, dev, ino, offset, length, writable, False, in_mm)


def release(r: Region, anchor: "weakref.ref[Any] | None" = None) -> None:
    """The attachment that used *r* is done with it (it dropped its own references first).

    Idle (nothing else in this process references the mapping): kept for
    reuse within the budget, its mapped mark dropped. *anchor*, a weak
    reference to the root ndarray every array view of the attachment is
    built on, defers that decision to the root's death when views are
    still alive (a SharedArray's segment goes just before its buffer does).
    Otherwise the mapping stays as it is until its last view goes; the mark
    goes with it.
    """
    if _busy:
        _sweep_busy()
    # References: r.mm, and getrefcount's argument. Any memoryview, ndarray
    # or Arrow buffer of the mapping adds one.
    if sys.getrefcount(r.mm) <= 2:
        _keep_idle(r)
        return
    obj = anchor() if anchor is not None else None
    if obj is not None:
        def on_death(_ref: "weakref.ref[Any]", r: Region = r) -> None:
            _settle(r)

        r.waiter = weakref.ref(obj, on_death)
        del obj
        return
    _give_up(r)


def _settle(r: Region) -> None:
    """The root ndarray of a released region died: keep it idle if that was its last user."""
    r.waiter = None
    try:
        # r.mm, getrefcount's argument, and the dying root's own buffer (a
        # root is cleared of weak references before it lets go of its buffer).
        if sys.getrefcount(r.mm) <= 3:
            _keep_idle(r)
        else:
            _give_up(r)
    except Exception:  # noqa: BLE001 - a weakref callback must not raise; the mapping stays marked
        pass


def _give_up(r: Region) -> None:
    """Still in use: leave the mapping to its views (the mark goes with it)."""
    if not r.own:
        _busy.append(r)
        return
    backend.unmap_without_recency(r.mm)
    if not r.fd_in_mm:
        backend.close(r.fd)  # the mapping's own duplicate keeps the description and its mark
    r.mm = None


def _keep_idle(r: Region) -> None:
    # Idle mappings hold memory of their own file system: each is bounded by its budget.
    try:
        cap = _budget_of(r.dev, lambda: backend.fd_total_bytes(r.fd))
    except OSError:  # pragma: no cover - the fd is ours
        cap = 0
    if cap <= 0 or r.length > cap or r.length < MIN_KEEP:
        _discard(r)
        return
    try:
        backend.drop_mapped(r.fd)
    except OSError:  # pragma: no cover - the fd is ours
        _discard(r)
        return
    _idle.append(r)
    total = sum(x.length for x in _idle if x.dev == r.dev)
    while len(_idle) > MAX_IDLE:
        old = _idle.pop(0)
        if old.dev == r.dev:
            total -= old.length
        _discard(old)
    for old in [x for x in _idle if x.dev == r.dev]:
        if total <= cap:
            break
        _idle.remove(old)
        total -= old.length
        _discard(old)


def _sweep_busy() -> None:
    for r in list(_busy):
        if sys.getrefcount(r.mm) <= 2:  # r.mm and getrefcount's argument: no view left
            _busy.remove(r)
            _discard(r)


def forget_file(dev: int, ino: int) -> None:
    """Unmap idle mappings of a file whose pages were just freed (no name keeps it any more)."""
    for r in [r for r in _idle if r.ino == ino and r.dev == dev]:
        _idle.remove(r)
        _discard(r)


def drop_idle() -> None:
    """Unmap every idle mapping (budget set to 0, exit, fork)."""
    while _idle:
        _discard(_idle.pop())


def idle_bytes() -> int:
    """Bytes of idle mappings kept now."""
    return sum(r.length for r in _idle)


def after_fork_in_child() -> None:
    """A forked child keeps none of its parent's idle mappings."""
    while _idle:
        r = _idle.pop()
        backend.close_mapping(r.mm)
        if not r.fd_in_mm:
            backend.close(r.fd)
    _busy.clear()  # the parent's: their marks are the parent's to drop


def region_after_fork(r: Region) -> None:
    """In a forked child, an attachment's mapping gets a mapped mark of its own.

    The inherited description is the parent's, whose mark the parent drops
    when its own views go; a new description marks the child's use.
    """
    old = r.fd
    try:
        r.fd = backend.reopen(old, r.writable)
        backend.hold_mapped(r.fd)
    except OSError:  # pragma: no cover - keep the parent's description (and its mark) then
        r.fd = old
        return
    if not r.fd_in_mm:
        backend.close(old)
    r.fd_in_mm = False  # the new description is ours to close
    r.own = False  # and the mapping does not hold it: its mark goes when we say so
