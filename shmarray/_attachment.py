"""One attachment of a shmarray segment: the control block, the OS resources, the lifetime.

The bytes of the control block are specified in ``_control``, next to their codec.

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
this attachment's locks alive. One mapping covers the control block and the
data (read-only for ReadOnly, where the lock mark is written through the fd).

One attachment per process. A process attaches a segment once per access
mode: every Segment object, SharedArray, table and unpickled reference of
it in this process uses that attachment (two descriptors, one mapping) and
counts as one of its users; the last user to go detaches. The registry
below finds an attachment by name (checked against the name's inode, so a
replaced segment is attached afresh) and by incarnation (what references
name).
"""

from __future__ import annotations

import errno
import threading
import weakref
from typing import Any

from ._errors import AccessMode, InvalidSizeError, ShmError
from ._reuse import idle_maps
from ._control import CONTROL, DEAD_OFFSET, MARK_OFFSET, U64, ControlBlock, parse_control
from . import _watch
from ._lock import LockGate
from ._os import PREFIX, backend

__all__ = ["register", "share_named", "share_instance", "held_instance", "release_user", "sweep_orphans"]

class _Attachment:
    """The OS resources of one attachment; closing it is the detach.

    Shared by every user of the segment in this process (``users`` counts
    them; see the registry below). It holds no reference to any Segment, so
    it can be closed when the last user goes or the interpreter exits.
    """

    __slots__ = ("name", "fd", "writable_fd", "ctl", "marks", "data_map", "data_offset", "head",
                 "size", "mode", "foreign", "persistent", "pid", "gate", "closed", "pinned", "region",
                 "ident", "root_ref", "incarnation", "users", "finalizer", "cache", "__weakref__")

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
        self.gate: LockGate | None = None
        self.closed = False
        self.pinned: Any = None  # a _cuda.PinnedRegion while pin()ned
        self.region: idle_maps.Region | None = None  # the mapping (shmarray segments)
        self.ident: tuple[int, int] = (0, 0)
        self.root_ref: Any = None  # weak reference to root()'s ndarray
        self.incarnation = 0
        self.users = 0
        self.finalizer: Any = None
        # What the payload layers derive once per attachment (a parsed header).
        self.cache: dict[str, Any] = {}

    def root(self) -> Any:
        """One uint8 ndarray over the user bytes, the base of every array view of this attachment.

        numpy keeps an ndarray base as it is (any other buffer it wraps in a
        memoryview of its own), so the root's death says exactly when the
        last array view of the attachment is gone: the moment its mapping
        can be kept idle for reuse (``idle_maps.release``).
        """
        root = self.root_ref() if self.root_ref is not None else None
        if root is None:
            import numpy as np

            region = self.region
            if region is None:  # a foreign segment: no reuse, a plain view
                root = np.frombuffer(self.data_map, np.uint8)
            else:
                start = self.data_offset if region.offset == 0 else 0
                root = np.frombuffer(region.mm, np.uint8, count=self.size, offset=start)
            self.root_ref = weakref.ref(root)
        return root

    def is_dead(self) -> bool:
        """True once a destroyer has marked the segment dead (read from the mapped control block)."""
        marks = self.marks
        return marks is not None and (marks[DEAD_OFFSET // 8] & 0xFFFFFFFF) != 0

    def _write_mark(self, value: int) -> None:
        backend.pwrite_all(self.fd, memoryview(U64.pack(value)), MARK_OFFSET)

    def map(self, cb: ControlBlock | None, map_fd: int | None = None,
            region: "idle_maps.Region | None" = None) -> None:
        """Map the control block and the data through *map_fd* (kept or closed here), a lock-free description.

        Mappings duplicate their fd, so they must never be made from the
        description that carries this attachment's locks. One mapping
        covers the control block and the data: writable for ReadWrite,
        read-only for ReadOnly (the lock mark is then written through the
        lock descriptor, when the user may write the segment). The mapping
        is a ``_reuse.idle_maps`` region: an idle mapping of the same file is taken
        when there is one (no page faults), and *region*, when given, is
        used as it is (a creator that wrote through it).
        """
        if map_fd is None and region is None:
            map_fd = backend.reopen(self.fd, self.writable_fd)
        writable_data = self.mode == AccessMode.ReadWrite
        try:
            if writable_data and not self.writable_fd:
                raise PermissionError(errno.EACCES, "the segment is not writable by this user")
            if cb is None:
                assert map_fd is not None
                self.size = backend.size_of(map_fd)
                if self.size <= 0:
                    raise InvalidSizeError(f"attach: native segment {self.name!r} is empty (0 bytes)")
                self.data_map = backend.map_region(map_fd, 0, self.size, writable_data)
            else:
                self.size = cb.size
                self.data_offset = cb.data_offset
                self.persistent = cb.persistent
                self.incarnation = cb.incarnation
                dev, ino = self.ident
                if region is not None and not writable_data:
                    idle_maps.release(region)  # a writable one the creator wrote through
                    region = None
                if region is None:
                    if map_fd is None:
                        map_fd = backend.reopen(self.fd, self.writable_fd)
                    fd, map_fd = map_fd, None  # the region keeps it or closes it
                    region = idle_maps.map_region(fd, dev, ino, 0, cb.data_offset + cb.size, writable_data)
                self.region = region
                self.ctl = region.mm
                self.data_map = memoryview(region.mm)[cb.data_offset : cb.data_offset + cb.size]
                self.marks = memoryview(region.mm)[:CONTROL.size].cast("Q")
        finally:
            if map_fd is not None:
                backend.close(map_fd)
        if cb is not None:
            write = self._write_mark if not writable_data and self.writable_fd else None
            self.gate = LockGate(self.fd, self.marks, self.pid, write)

    def close(self) -> None:
        """Release locks, destroy the segment if this was its last attachment, close the fd."""
        if self.closed:
            return
        self.closed = True
        _unregister(self)
        try:
            if self.pinned is not None and self.pid == backend.getpid():
                # Unregister while the region still holds the mapping: it must
                # never be unmapped (by the last view going) while CUDA has it.
                pinned, self.pinned = self.pinned, None
                try:
                    pinned.release()
                except Exception:  # noqa: BLE001 - at exit the CUDA runtime may be gone already
                    pass
            gate = self.gate
            if gate is not None and gate.owner is not None and self.pid == backend.getpid():
                gate.owner.release()  # clears the holder mark: nobody died holding it
            self._drop_mappings()
            if not self.foreign and self.pid == backend.getpid():
                may_destroy = self.writable_fd and not self.persistent
                if may_destroy and not backend.others_attached(self.fd) and backend.try_sole(self.fd):
                    _retire(self.fd, self.name)
                    may_destroy = False
                backend.drop_liveness(self.fd, self.pid)
                # Two last users detaching at once each see the other's hold and
                # leave, orphaning the name in /dev/shm (workers of a pool that
                # finish together do this). Whoever finds itself alone once its own
                # hold is gone destroys it; the lock taken here goes with the fd.
                if may_destroy and not backend.others_attached(self.fd) and backend.try_sole(self.fd):
                    _retire(self.fd, self.name)
        except OSError:  # pragma: no cover - the fd is ours; nothing sensible to report at exit
            pass
        finally:
            if self.region is not None or self.ctl is not None:  # an OSError before _drop_mappings
                self._drop_mappings()
            backend.close(self.fd)

    def _drop_mappings(self) -> None:
        """Let go of this attachment's mappings: views may outlive the detach (the region decides)."""
        if self.marks is not None:
            self.marks.release()
            self.marks = None
        region, self.region = self.region, None
        self.ctl = None
        if region is None and self.data_map is not None:
            backend.unmap_without_recency(self.data_map)  # a foreign segment's plain mapping
        self.data_map = None
        self.cache.clear()
        anchor, self.root_ref = self.root_ref, None
        if region is not None:
            if self.pid == backend.getpid():
                idle_maps.release(region, anchor)
            else:  # pragma: no cover - a forked child that never re-marked it
                if not region.fd_in_mm:
                    backend.close(region.fd)

    def after_fork(self) -> None:
        """In a forked child: become an attachment of our own (new description, new locks)."""
        if self.closed:
            return
        pid = backend.getpid()
        try:
            # A description of our own under the same number (the locks of every
            # Segment object have it bound); replacing the inherited one leaves the
            # parent's locks alone: the parent still holds that description.
            backend.reopen_in_place(self.fd, self.writable_fd)
            if not self.foreign:
                backend.hold_liveness(self.fd, pid)
        except OSError:  # pragma: no cover - nothing to do in a child that cannot reopen
            self.closed = True
            return
        self.pid = pid
        if self.region is not None:
            idle_maps.region_after_fork(self.region)
        if self.pinned is not None:
            self.pinned.forget()  # the CUDA registration is the parent's
            self.pinned = None
        if self.gate is not None:
            self.gate.after_fork(pid)


# -- one attachment per process ------------------------------------------------------------------
#
# Reentrant: a user's finalizer (a Segment collected) can run inside any
# allocation, also while this thread holds the registry.
_REG = threading.RLock()
_BY_NAME: "dict[tuple[str, AccessMode], _Attachment]" = {}
_BY_INCARNATION: "dict[tuple[int, AccessMode], _Attachment]" = {}
_OPEN: "set[_Attachment]" = set()


def register(att: _Attachment) -> None:
    """Make a new attachment (one user: the caller) findable, and closed at exit."""
    with _REG:
        att.users = 1
        _OPEN.add(att)
        _BY_NAME[(att.name, att.mode)] = att
        if att.incarnation:
            _BY_INCARNATION[(att.incarnation, att.mode)] = att
    # Holding att itself, it never fires on collection: only when the last
    # user calls it, or at interpreter exit.
    att.finalizer = weakref.finalize(att, _Attachment.close, att)
    if not att.foreign:
        _watch.hold(att.name)  # freed by the watcher if this process dies as its last holder


def _unregister(att: _Attachment) -> None:
    with _REG:
        _OPEN.discard(att)
        key = (att.name, att.mode)
        if _BY_NAME.get(key) is att:
            del _BY_NAME[key]
        key2 = (att.incarnation, att.mode)
        if _BY_INCARNATION.get(key2) is att:
            del _BY_INCARNATION[key2]


def _take(att: _Attachment | None) -> _Attachment | None:
    if att is None or att.closed or att.pid != backend.getpid():
        return None
    att.users += 1
    if att.closed:  # its last user went (a finalizer) between the lookup and the count
        att.users -= 1
        return None
    return att


def holds_name(name: str, mode: AccessMode) -> bool:
    """True when this process has an attachment made under *name* in *mode* (perhaps of an older segment)."""
    return (name, mode) in _BY_NAME


def share_named(name: str, mode: AccessMode, dev: int, ino: int) -> _Attachment | None:
    """This process's attachment of the segment the name *name* has now (device *dev*, inode *ino*), as one more user."""
    with _REG:
        att = _BY_NAME.get((name, mode))
        if att is None or att.ident != (dev, ino) or att.is_dead():
            return None
        return _take(att)


def share_instance(incarnation: int, mode: AccessMode) -> _Attachment | None:
    """This process's attachment of the segment instance *incarnation*, as one more user; None when it has none."""
    with _REG:
        return _take(_BY_INCARNATION.get((incarnation, mode)))


def held_instance(incarnation: int) -> _Attachment | None:
    """Any open attachment of instance *incarnation* in this process (whatever its mode), not counted."""
    with _REG:
        for mode in (AccessMode.ReadWrite, AccessMode.ReadOnly):
            att = _BY_INCARNATION.get((incarnation, mode))
            if att is not None and not att.closed and att.pid == backend.getpid():
                return att
    return None


def release_user(att: _Attachment) -> None:
    """One user of *att* is done; the last one detaches."""
    with _REG:
        att.users -= 1
        if att.users > 0 or att.closed:
            return
        _unregister(att)  # nobody finds it any more
    if not att.foreign:
        _watch.release(att.name)
    if att.finalizer is not None:
        att.finalizer()
    else:  # pragma: no cover - never registered
        att.close()


# A process's first weakref.finalize registers the atexit hook (benchmarks/results/notes.md):
# pay that at import rather than in the first attach().
weakref.finalize(_OPEN, int).detach()


# Between fork() and the child's own locks (its after-fork hook) the parent
# could detach, destroy and even recycle a segment the child inherited. Before
# each fork, one description per attachment holds liveness and mapped locks
# for the child: the parent closes its copy right after the fork, the child
# once it holds locks of its own.
_FORK_GUARDS: list[int] = []


def _before_fork() -> None:
    pid = backend.getpid()
    for att in list(_OPEN):
        if att.closed or att.foreign or att.pid != pid:
            continue
        try:
            guard = backend.reopen(att.fd, att.writable_fd)
        except OSError:  # pragma: no cover - out of descriptors: the child reopens as before
            continue
        try:
            backend.hold_guard(guard)
        except OSError:  # pragma: no cover
            backend.close(guard)
            continue
        _FORK_GUARDS.append(guard)


def _after_fork_in_parent() -> None:
    while _FORK_GUARDS:
        backend.close(_FORK_GUARDS.pop())


def _after_fork_in_child() -> None:
    global _REG
    _REG = threading.RLock()  # another thread may have held it at the fork
    guards = list(_FORK_GUARDS)
    _FORK_GUARDS.clear()
    idle_maps.after_fork_in_child()
    for att in list(_OPEN):
        att.after_fork()
        if not att.closed and not att.foreign:
            _watch.hold(att.name)  # held in the child's own right: watched in its own right
    for guard in guards:
        backend.close(guard)


backend.register_after_fork_in_child(_after_fork_in_child)
backend.register_fork_hooks(_before_fork, _after_fork_in_parent)


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
        _retire(fd, name)
        return True
    except ShmError:
        return False
    finally:
        backend.close(fd)  # the only fd of this description: its lock goes with it


def sweep_orphans(names: "list[str] | None" = None) -> list[str]:
    """Remove the segments among *names* (default: every key-named one) that every user left by dying.

    Not persistent ones, and never one anyone is attached to (this process
    included): ``_reap_if_dead`` decides. Returns the names removed.
    """
    if names is None:
        names = [n for n in backend.list_names() if n.startswith(PREFIX)]
    removed = []
    for name in names:
        try:
            if _reap_if_dead(name):
                removed.append(name)
        except OSError:  # another user's segment (EACCES), or raced with its removal
            pass
    return removed


def _mark_dead(fd: int) -> None:
    backend.pwrite_all(fd, memoryview(b"\x01"), DEAD_OFFSET)


def _retire(fd: int, name: str) -> None:
    """Destroy a segment (the caller holds its liveness byte exclusively): dead, nameless, pages freed.

    The pages are freed now when no other name keeps the file (a creator's
    hidden link keeps it for reuse, see ``_reuse.kept_files``) and no mapping anywhere
    uses it: idle mappings kept for reuse in other processes would otherwise
    hold the memory of a segment that is gone.
    """
    _mark_dead(fd)
    backend.unlink_if_same(name, fd)
    dev, ino, _, nlink = backend.fd_facts(fd)
    if nlink == 0 and not backend.mapped_elsewhere(fd):
        backend.release_pages(fd)
        idle_maps.forget_file(dev, ino)
