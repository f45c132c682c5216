"""One attachment of a shmarray segment: the control block, the OS resources, the lifetime.

Byte layout of a shmarray segment (one object in /dev/shm)::

    [0, PAGE_SIZE)            control block (below)
    [PAGE_SIZE, +size)        the user's bytes: Segment.data

Control block, little-endian::

    offset  size  field
    0       8     magic b"SHMARRAY"
    8       4     version (1)
    12      4     flags: bit 0 persistent
    16      8     size: usable bytes, what every attacher's .size reports
    24      8     data offset (the page size of the creating machine)
    32      8     lock mark: pid of the exclusive lock holder, 0 when free
    40      4     dead: 1 once a destroyer has removed the segment
    44      4     creator pid
    48      8     creation time (float64, UNIX seconds)
    56      4     key length in bytes (UTF-8; 0 when created by native key)
    60      4     reserved (0)
    64      ...   the key (cut to fit the page; for listings only)

Lifetime. Every attachment holds a shared OFD lock on byte 0 of its own open
file description. The kernel drops it when the attachment's process dies. A
detacher that can convert its lock to exclusive is the last one: it marks the
segment dead and removes the name. An attacher that can take it exclusively
found a segment whose attachers all died: it removes it at once (unless
persistent). A new segment is built under a private temporary name, locked,
and only then linked to its public name, so nobody sees it half made and of
several racing creators exactly one wins.

Attach. The shared lock comes first (it waits out a destroyer), then one
pread returns the control block, with the dead flag as it is now, and the
first HEAD_BYTES of the user area (the payload header). Mappings are made
from a second open file description that carries no lock: a mapping keeps a
duplicate of its fd, and a forked child's inherited mapping must never keep
this attachment's locks alive.
"""

from __future__ import annotations

import errno
import struct
import time
import weakref
from typing import Any

from ._errors import AccessMode, InvalidSizeError, ShmError, UnknownShmError
from ._lock import SegmentLock
from ._os import backend

__all__ = ["MAGIC", "CONTROL", "PAGE_SIZE", "HEAD_BYTES", "ControlBlock", "parse_control"]

MAGIC = b"SHMARRAY"
VERSION = 1
FLAG_PERSISTENT = 1
CONTROL = struct.Struct("<8sIIQQQIIdII")  # fields up to the key; 64 bytes
_DEAD_OFFSET = 40
_KEY_OFFSET = 64
PAGE_SIZE = backend.PAGE_SIZE
# How much of the user area attach() reads with the control block: a payload
# header and a typical descriptor (an .npy header is 128 bytes), no more.
HEAD_BYTES = 448


class ControlBlock:
    """The parsed control block of a shmarray segment."""

    __slots__ = ("version", "flags", "size", "data_offset", "mark", "dead", "creator", "created", "key")

    def __init__(self, raw: bytes) -> None:
        (magic, self.version, self.flags, self.size, self.data_offset, self.mark, self.dead,
         self.creator, self.created, keylen, _) = CONTROL.unpack_from(raw, 0)
        keylen = min(keylen, max(0, len(raw) - _KEY_OFFSET))
        self.key: str | None = (
            raw[_KEY_OFFSET : _KEY_OFFSET + keylen].decode("utf-8", "replace") if keylen else None
        )

    @property
    def persistent(self) -> bool:
        """True when the segment outlives its last detach."""
        return bool(self.flags & FLAG_PERSISTENT)


def parse_control(raw: bytes, object_size: int) -> ControlBlock | None:
    """The control block in *raw*, None if *raw* does not start with one.

    Raises UnknownShmError when the magic is there but the fields are not
    consistent with an object of *object_size* bytes.
    """
    if len(raw) < CONTROL.size or raw[:8] != MAGIC:
        return None
    cb = ControlBlock(raw)
    if cb.version != VERSION:
        raise UnknownShmError(
            f"segment control block has version {cb.version}; this shmarray reads version {VERSION}"
        )
    if cb.data_offset < CONTROL.size or cb.data_offset % 64 or cb.data_offset + cb.size > object_size:
        raise UnknownShmError(
            f"segment control block is corrupt: data at {cb.data_offset} + {cb.size} bytes "
            f"does not fit the {object_size}-byte object"
        )
    return cb


def _control_bytes(size: int, persistent: bool, key: str | None) -> bytes:
    raw_key = b"" if key is None else key.encode("utf-8", "surrogatepass")[: PAGE_SIZE - _KEY_OFFSET]
    head = CONTROL.pack(
        MAGIC, VERSION, FLAG_PERSISTENT if persistent else 0, size, PAGE_SIZE, 0, 0,
        backend.getpid() & 0xFFFFFFFF, time.time(), len(raw_key), 0,
    )
    return head + raw_key


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class _Attachment:
    """The OS resources of one attachment; closing it is the detach.

    It holds no reference to its Segment, so a weakref finalizer can close it
    when the Segment is collected or the interpreter exits.
    """

    __slots__ = ("name", "fd", "writable_fd", "ctl", "marks", "data_map", "data_offset", "head",
                 "size", "mode", "foreign", "persistent", "pid", "lock", "closed", "pinned", "__weakref__")

    def __init__(self, name: str, fd: int, writable_fd: bool, mode: AccessMode, foreign: bool) -> None:
        self.name = name
        self.fd = fd
        self.writable_fd = writable_fd
        self.mode = mode
        self.foreign = foreign
        self.ctl: Any = None
        self.marks: memoryview | None = None
        self.data_map: Any = None
        self.data_offset = 0
        # The first bytes of the user area as read at attach (a payload
        # header and its descriptor, usually): b"" when not read.
        self.head = b""
        self.size = 0
        self.persistent = False
        self.pid = backend.getpid()
        self.lock: SegmentLock | None = None
        self.closed = False
        self.pinned: Any = None  # a _cuda.PinnedRegion while pin()ned

    def map(self, cb: ControlBlock | None, map_fd: int | None = None) -> None:
        """Map the control block and the data through *map_fd* (closed here), a lock-free description.

        Mappings duplicate their fd, so they must never be made from the
        description that carries this attachment's locks. When the control
        block and the data are both writable (ReadWrite, the common case) one
        mapping covers both: one mmap instead of two on every attach.
        """
        if map_fd is None:
            map_fd = backend.reopen(self.fd, self.writable_fd)
        writable_data = self.mode == AccessMode.ReadWrite
        try:
            if writable_data and not self.writable_fd:
                raise PermissionError(errno.EACCES, "the segment is not writable by this user")
            if cb is None:
                self.size = backend.size_of(map_fd)
                if self.size <= 0:
                    raise InvalidSizeError(f"attach: native segment {self.name!r} is empty (0 bytes)")
                self.data_map = backend.map_region(map_fd, 0, self.size, writable_data)
            else:
                self.size = cb.size
                self.data_offset = cb.data_offset
                self.persistent = cb.persistent
                if writable_data:
                    whole = backend.map_region(map_fd, 0, cb.data_offset + cb.size, True)
                    self.ctl = whole
                    self.data_map = memoryview(whole)[cb.data_offset:]
                else:
                    self.ctl = backend.map_region(map_fd, 0, cb.data_offset, self.writable_fd)
                    self.data_map = backend.map_region(map_fd, cb.data_offset, cb.size, False)
                self.marks = memoryview(self.ctl).cast("B")[:CONTROL.size].cast("Q")
        finally:
            backend.close(map_fd)
        self.lock = SegmentLock(self.fd, self.marks, self.pid) if cb is not None else None

    def close(self) -> None:
        """Release locks, destroy the segment if this was its last attachment, close the fd."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        try:
            if self.pinned is not None and self.pid == backend.getpid():
                # Unregister while the region still holds the mapping: it must
                # never be unmapped (by the last view going) while CUDA has it.
                pinned, self.pinned = self.pinned, None
                try:
                    pinned.release()
                except Exception:  # noqa: BLE001 - at exit the CUDA runtime may be gone already
                    pass
            if self.lock is not None:
                self.lock.release()
            if not self.foreign and self.pid == backend.getpid():
                may_destroy = self.writable_fd and not self.persistent
                if may_destroy and not backend.others_attached(self.fd) and backend.try_sole(self.fd):
                    self._destroy()
                    may_destroy = False
                backend.drop_liveness(self.fd, self.pid)
                # Two last users detaching at once each see the other's hold and
                # leave, orphaning the name in /dev/shm (workers of a pool that
                # finish together do this). Whoever finds itself alone once its own
                # hold is gone destroys it; the lock taken here goes with the fd.
                if may_destroy and not backend.others_attached(self.fd) and backend.try_sole(self.fd):
                    self._destroy()
        except OSError:  # pragma: no cover - the fd is ours; nothing sensible to report at exit
            pass
        finally:
            # Views may outlive the detach; the mapping is unmapped when the last goes.
            data = self.ctl if isinstance(self.data_map, memoryview) else self.data_map
            if data is not None:
                backend.unmap_without_recency(data)
            if self.marks is not None:
                self.marks.release()
                self.marks = None
            if self.ctl is not None:
                if not isinstance(self.data_map, memoryview):
                    self.ctl.close()  # its own mapping; one shared with the data goes with the data
                self.ctl = None
            # The data mapping is not closed: live views keep it, and it is
            # unmapped when the last of them is collected.
            self.data_map = None
            backend.close(self.fd)

    def _destroy(self) -> None:
        """Mark the segment dead and remove its name (the caller holds the liveness byte exclusively)."""
        if self.ctl is not None:
            self.ctl[_DEAD_OFFSET] = 1
        backend.unlink_if_same(self.name, self.fd)

    def after_fork(self) -> None:
        """In a forked child: become an attachment of our own (new description, new locks)."""
        if self.closed:
            return
        old = self.fd
        pid = backend.getpid()
        try:
            self.fd = backend.reopen(old, self.writable_fd)
            if not self.foreign:
                backend.hold_liveness(self.fd, pid)
        except OSError:  # pragma: no cover - nothing to do in a child that cannot reopen
            self.fd = old
            self.closed = True
            return
        # Closing the inherited fd leaves the parent's locks alone: the parent
        # still holds the description.
        backend.close(old)
        self.pid = pid
        if self.pinned is not None:
            self.pinned.forget()  # the CUDA registration is the parent's
            self.pinned = None
        if self.lock is not None:
            self.lock.forget(self.fd, pid)


_LIVE: "weakref.WeakSet[_Attachment]" = weakref.WeakSet()
# A process's first weakref.finalize registers the atexit hook (~45 us here):
# pay that at import rather than in the first attach().
weakref.finalize(_LIVE, int).detach()


def _after_fork_in_child() -> None:
    for att in list(_LIVE):
        att.after_fork()


backend.register_after_fork_in_child(_after_fork_in_child)


def _reap_if_dead(name: str) -> bool:
    """Remove *name* if it is a shmarray segment nobody is attached to.

    True when the name is gone (removed here, or already), False when it is
    alive, persistent, or not a shmarray segment.
    """
    try:
        fd = backend.open_existing(name, True)
    except FileNotFoundError:
        return True
    try:
        if not backend.try_sole(fd):
            return False
        cb = parse_control(backend.pread(fd, CONTROL.size, 0), backend.size_of(fd))
        if cb is None or (cb.persistent and not cb.dead):
            return False
        _mark_dead(fd)
        backend.unlink_if_same(name, fd)
        return True
    except ShmError:
        return False
    finally:
        backend.close(fd)  # the only fd of this description: its lock goes with it


def _mark_dead(fd: int) -> None:
    backend.pwrite_all(fd, memoryview(b"\x01"), _DEAD_OFFSET)
