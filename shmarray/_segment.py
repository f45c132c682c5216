"""Segment: a named shared-memory segment (the QSharedMemory core).

The byte layout of a segment, its control block and the lifetime rules
(liveness locks, publication by link(2)) are described in _attachment,
which holds the OS resources of one attachment; this module is the
Qt-shaped object around them: keys, create/attach/detach, errors as Qt
keeps them, the lock and pinning.
"""

from __future__ import annotations

import errno
import operator
import os
import threading
import weakref
from typing import Any, Callable, SupportsIndex, Union

from . import _reuse, _stash
from ._attachment import (
    _Attachment,
    _mark_dead,
    _reap_if_dead,
    _retire,
    held_instance,
    holds_name,
    register,
    release_user,
    share_instance,
    share_named,
)
from ._control import HEAD_BYTES, PAGE_SIZE, ControlBlock, control_bytes, new_incarnation, parse_control
from ._display import human as _human
from ._errors import (
    AccessMode,
    AlreadyExistsError,
    InvalidSizeError,
    LockError,
    NotFoundError,
    OutOfResourcesError,
    PermissionDeniedError,
    SharedMemoryError,
    ShmError,
    UnknownShmError,
    _InvalidSizeTypeError,
)
from ._lock import Holds, SegmentLock, check_timeout
from ._os import TEMP_PREFIX, backend, check_key, check_native_key, native_key_for
from ._os._names import qt_posix_names
from ._transfer import rebuild_specially, special

__all__ = ["Segment", "PAYLOAD_INTERFACE"]

#: The private names of Segment that the layers above may use (see the end of the class).
PAYLOAD_INTERFACE = frozenset({"_create", "_boundary", "_no_space", "_mapping", "_root", "_head", "_cache",
                               "_lock_fd", "_holds", "_reference", "_of_instance", "_dir", "_ident"})

#: A ``dir=`` argument: the segment directory (None: ``SHMARRAY_DIR``, else /dev/shm).
Dir = Union[str, "os.PathLike[str]", None]


def _check_size(size: object, what: str) -> int:
    # isinstance(int) first: the runtime Protocol check costs ~7 us, an int needs none.
    if isinstance(size, bool) or not (isinstance(size, int) or isinstance(size, SupportsIndex)):
        raise _InvalidSizeTypeError(f"{what}: size must be an int, not {type(size).__name__} ({size!r})")
    value = operator.index(size)
    if value <= 0:
        raise InvalidSizeError(f"{what}: size must be > 0 bytes, got {value}")
    return value


def _gaps(written: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of [0, size) that no (offset, length) in *written* covers."""
    out = []
    at = 0
    for lo, n in sorted(written):
        if lo > at:
            out.append((at, lo - at))
        at = max(at, lo + n)
    if at < size:
        out.append((at, size - at))
    return out


# Gaps a recycled segment's fill did not write are zeroed in pieces of this size.
_ZERO_CHUNK = 4 << 20


def _user_writer(size: int, raw: Callable[[memoryview, int], None],
                 written: list[tuple[int, int]] | None = None) -> Callable[[memoryview, int], None]:
    """The ``write(data, offset)`` a fill gets: user offsets, bounds-checked, onto *raw* (file offsets).

    *written*, when given, records each (offset, length), so the bytes no
    write covered can be zeroed.
    """
    def write(data: memoryview, offset: int) -> None:
        if offset < 0 or offset + data.nbytes > size:
            raise ValueError(f"write of {data.nbytes} bytes at {offset} overruns {size}")
        raw(data, PAGE_SIZE + offset)
        if written is not None:
            written.append((offset, data.nbytes))
    return write


def no_space(what: str, label: str | None, key: str | None, directory: str | None,
             needed: int | None = None, cause: str = "") -> OutOfResourcesError:
    """The one out-of-space message: what was needed, what the directory holds, and what to do about it."""
    where = directory or backend.SHM_DIR
    need = f"needs {_human(needed)}" if needed is not None else f"is out of space ({cause or 'no space left'})"
    return OutOfResourcesError(
        f"{what}: segment {label!r} {need} but {where} has {_human(backend.free_bytes(directory))} free "
        f"(of {_human(backend.total_bytes(directory))}); remove segments (`shmarray gc`, `shmarray rm KEY`), "
        f"make it smaller, or enlarge {where}", key)


#: Why a segment can be missing, said wherever NotFoundError names a key that nothing holds.
LIFETIME_RULE = ("A segment lives while some process holds it (an array, a view or a table of it): keep one "
                 "alive, or create it with persistent=True.")


def missing(what: str, key: str | None, directory: str | None = None, native: str | None = None) -> NotFoundError:
    """NotFoundError for a name with no segment, saying why as far as it can be told from outside.

    A missing directory is named; a Qt program's (or another library's)
    object under the key's Qt names is pointed to ``attach_qt``; otherwise
    the key was never created or its last holder detached or exited.
    """
    where = directory or backend.SHM_DIR
    label = key if key is not None else native
    problem = backend.dir_problem(where, writable=False)
    if problem is not None:
        return NotFoundError(f"{what}: no segment {label!r}: the segment directory {where!r} {problem}", key)
    if key is None:
        return NotFoundError(f"{what}: there is no object {native!r} in {where}", key)
    for name in qt_posix_names(key):
        if backend.name_facts("/dev/shm/" + name) is not None:
            return NotFoundError(
                f"{what}: no shmarray segment {key!r}, but /dev/shm/{name} exists: a segment that a Qt "
                f"program's QSharedMemory made (map it with shmarray.attach_qt(key, dtype, shape) or "
                f"shmarray.qt.QSharedMemory) or another library's (Segment(native_key={name!r}))", key)
    return NotFoundError(
        f"{what}: no segment {key!r} in {where}: it was never created, or the last process holding it "
        f"detached or exited. {LIFETIME_RULE}", key)


def _translate(e: OSError, what: str, key: str | None, directory: str | None = None) -> ShmError:
    """An OSError from the OS layer as the ShmError a user should see (*directory*: the segment's)."""
    code = e.errno
    if code == errno.ENOENT:
        return missing(what, key, directory)
    if code == errno.EEXIST:
        return AlreadyExistsError(f"{what}: segment {key!r} already exists", key)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDeniedError(f"{what}: permission denied for segment {key!r} ({e.strerror})", key)
    hint = backend.limits_hint(code) if code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) else ""
    if hint:
        return OutOfResourcesError(f"{what}: out of resources for segment {key!r}: {hint}", key)
    if code in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EOVERFLOW):
        return no_space(what, key, key, directory, cause=e.strerror or "")
    if code in (errno.EMFILE, errno.ENFILE):
        return OutOfResourcesError(f"{what}: out of resources for segment {key!r} ({e.strerror})", key)
    return UnknownShmError(f"{what}: {e.strerror or e} (segment {key!r})", key)


class Segment:
    """A named shared-memory segment, modelled on Qt's QSharedMemory.

    ``Segment(key)`` derives a native (OS) name from *key*; ``Segment(native_key=...)``
    uses an OS name as is (e.g. a ``multiprocessing.shared_memory`` segment).
    Failures raise :class:`ShmError` subclasses; ``error``/``error_string``
    keep the last error as Qt does.
    """

    # Defaults at class level, so detach() and __del__ work on a half-built object.
    _key: str | None = None
    _native: str | None = None
    _dir: str | None = None  # the segment directory; None: the default (SHMARRAY_DIR or /dev/shm)
    _att: _Attachment | None = None
    _finalizer: Any = None
    _lk: SegmentLock | None = None  # this object's lock (through its attachment's gate), for the hot path
    _own_fd: "list[int] | None" = None  # a description of this object's own, for byte-range locks
    _locked_default: "_Locked | None" = None
    _error: SharedMemoryError = SharedMemoryError.NoError
    _error_string: str = ""

    def __init__(self, key: str | None = None, *, native_key: str | None = None,
                 dir: Dir = None) -> None:
        if key is not None and native_key is not None:
            raise ValueError("pass key or native_key, not both")
        if dir is not None:
            self._dir = _check_dir(dir)
        if key is not None:
            self._key = check_key(key)
            self._native = native_key_for(key)
        elif native_key is not None:
            self._native = check_native_key(native_key)
        self._mutex = threading.RLock()

    # -- keys ----------------------------------------------------------------

    @property
    def key(self) -> str | None:
        """The key, or None when none is set or a native key was set directly."""
        return self._key

    @property
    def native_key(self) -> str | None:
        """The OS name of the segment (without the leading '/')."""
        return self._native

    @property
    def dir(self) -> str:
        """The directory the segment lives in (``dir=``, else ``SHMARRAY_DIR``, else /dev/shm)."""
        return self._dir or backend.SHM_DIR

    def set_key(self, key: str | None) -> None:
        """Set the key; the same key is a no-op, otherwise an attached segment is detached first."""
        if key is not None:
            check_key(key)
        if key == self._key and (key is not None or self._native is None):
            return
        self.detach()
        self._key = key
        self._native = None if key is None else native_key_for(key)

    def set_native_key(self, native_key: str | None) -> None:
        """Set the OS name directly; the key becomes None. Same value: no-op."""
        bare = None if native_key is None else check_native_key(native_key)
        if bare == self._native and self._key is None:
            return
        self.detach()
        self._key = None
        self._native = bare

    def _label(self) -> str | None:
        return self._key if self._key is not None else self._native

    # -- errors as Qt keeps them -------------------------------------------------

    @property
    def error(self) -> SharedMemoryError:
        """The last error of this object (NoError after a success)."""
        return self._error

    @property
    def error_string(self) -> str:
        """A text for the last error ('' after a success)."""
        return self._error_string

    def _ok(self) -> None:
        self._error = SharedMemoryError.NoError
        self._error_string = ""

    def _fail(self, exc: ShmError) -> ShmError:
        self._error = exc.code
        self._error_string = str(exc)
        # Raised again from the public method: the frames below it are internals.
        return exc.with_traceback(None)

    def _need_name(self, what: str) -> str:
        if self._native is None:
            from ._errors import InvalidKeyError

            raise self._fail(InvalidKeyError(f"{what}: no key set; pass a key to Segment() or set_key()"))
        if self._dir is not None:
            try:
                check_usable(self._dir, what, writable=what == "create")
            except ShmError as e:
                raise self._fail(e) from None
        return backend.qualify(self._dir, self._native)

    # -- create / attach / detach --------------------------------------------------

    def create(
        self,
        size: int,
        mode: AccessMode = AccessMode.ReadWrite,
        *,
        persistent: bool = False,
        permissions: int = 0o600,
    ) -> Segment:
        """Create a new segment of *size* usable bytes (zero-filled) and attach to it."""
        return self._create(size, mode, persistent=persistent, permissions=permissions)

    def _build(self, name: str, size: int, mode: AccessMode, persistent: bool, permissions: int,
               fill: Callable[[Callable[[memoryview, int], None]], None] | None, reserve: bool) -> _Attachment:
        recycle = not persistent
        if recycle:
            taken = _stash.take(PAGE_SIZE + size, self._dir)
            if taken is not None:
                return self._build_in(taken, name, size, mode, fill)
        pid = backend.getpid()
        temp = backend.qualify(self._dir, f"{TEMP_PREFIX}{pid}-{backend.token_hex(6)}")
        fd = backend.create_exclusive(temp, permissions)
        published = False
        kept: str | None = None
        try:
            backend.chmod(fd, permissions)  # exactly what was asked, whatever the umask
            # Locked before anything else, so gc never mistakes it for an orphan.
            backend.hold_liveness(fd, pid)
            total = PAGE_SIZE + size
            populated = None
            if total >= backend.HUGE_PAGE and backend.huge_pages(self._dir) == "advise":
                # Huge pages only for a mapping that asks: fill through one (writes via
                # the fd would allocate 4 KiB pages), its pages allocated up front.
                backend.truncate(fd, total)
                populated = backend.map_populated_huge(fd, total)
            if populated is not None:
                mm = populated

                def write(data: memoryview, at: int) -> None:
                    backend.copy_into(mm, at, data)
            else:
                if reserve:
                    backend.reserve(fd, total)
                else:
                    backend.truncate(fd, total)

                def write(data: memoryview, at: int) -> None:
                    backend.pwrite_all(fd, data, at)
            try:
                control = control_bytes(size, persistent, self._key, new_incarnation())
                write(memoryview(control), 0)
                if fill is not None:
                    fill(_user_writer(size, write))
            finally:
                if populated is not None:
                    del write, mm
                    backend.close_mapping(populated)
            if recycle:
                kept = _stash.keep(temp, name, total, fd)
            self._publish(temp, name)
            published = True
            att = _Attachment(name, fd, True, mode, foreign=False)
            att.ident = backend.identity(fd)
            att.map(ControlBlock(control))
            return att
        except BaseException:
            if published:
                backend.unlink_if_same(name, fd)
            _stash.forget(kept)
            backend.close(fd)
            raise
        finally:
            backend.unlink(temp)

    def _build_in(self, taken: _stash.Taken, name: str, size: int, mode: AccessMode,
                  fill: Callable[[Callable[[memoryview, int], None]], None] | None) -> _Attachment:
        """Build the new segment in a recycled file (claimed: nobody attached, nobody maps it).

        Writes go through this process's idle mapping of the file when it has
        one (a memcpy into mapped pages), else through the fd into allocated
        pages. Every byte the fill does not write is zeroed: nothing of the
        segment that used the file before can be read in this one.
        """
        fd, kept = taken
        pid = backend.getpid()
        region = _reuse.find_idle(kept.dev, kept.ino, 0, PAGE_SIZE + size, True)
        written: list[tuple[int, int]] = []
        published = False
        try:
            control = control_bytes(size, False, self._key, new_incarnation())
            raw_write: Callable[[memoryview, int], None]
            if region is not None:
                warm = region

                def raw_write(data: memoryview, at: int) -> None:
                    # Through the region, so that no reference to the mmap outlives
                    # the build (a ReadOnly creator hands it back idle).
                    backend.copy_into(warm.mm, at, data)
            else:
                def raw_write(data: memoryview, at: int) -> None:
                    backend.pwrite_all(fd, data, at)
            # The whole control page: the old key's bytes must not linger after a shorter one.
            raw_write(memoryview(control + bytes(PAGE_SIZE - len(control))), 0)
            if fill is not None:
                fill(_user_writer(size, raw_write, written))
            gaps = _gaps(written, size)
            zeros = memoryview(bytes(min(_ZERO_CHUNK, max(n for _, n in gaps)))) if gaps else None
            for lo, n in gaps:
                assert zeros is not None
                for at in range(lo, lo + n, _ZERO_CHUNK):
                    raw_write(zeros[: min(_ZERO_CHUNK, lo + n - at)], PAGE_SIZE + at)
            # Exclusive -> shared (atomic), plus this process's marker: attached.
            backend.hold_liveness(fd, pid)
            self._publish(kept.name, name)
            published = True
            _stash.published(kept, name)
            att = _Attachment(name, fd, True, mode, foreign=False)
            att.ident = (kept.dev, kept.ino)
            cb = ControlBlock(control)
            att.map(cb, region=region)
            return att
        except BaseException:
            if published:
                backend.unlink_if_same(name, fd)
            # Back to a dead kept file: whoever looks at it again sees it so.
            try:
                _mark_dead(fd)
            except OSError:  # pragma: no cover
                pass
            if region is not None:
                _reuse.release(region)
            backend.close(fd)
            raise

    def _publish(self, source: str, name: str) -> None:
        """Give the built file *source* its public *name* (link(2): of racing creators one wins)."""
        while not backend.link(source, name):
            if not _reap_if_dead(name):
                raise AlreadyExistsError(
                    f"create: segment {self._label()!r} already exists; attach() to it, "
                    f"or unlink it first (shmarray.unlink / `shmarray rm`)", self._key)

    def attach(self, mode: AccessMode = AccessMode.ReadWrite) -> Segment:
        """Attach to an existing segment; raises NotFoundError if there is none."""
        with self._mutex:
            what = "attach"
            try:
                mode = AccessMode(mode)
            except ValueError as e:
                raise self._fail(UnknownShmError(f"attach: invalid access mode {mode!r}")) from e
            name = self._need_name(what)
            if self._att is not None:
                raise self._fail(AlreadyExistsError(
                    f"attach: this object is already attached to segment {self._label()!r}; "
                    "detach() it first", self._key))
            try:
                self._att = self._open(name, mode)
            except ShmError as e:
                raise self._fail(e) from None
            except FileNotFoundError:
                raise self._fail(missing(what, self._key, self._dir, self._native)) from None
            except OSError as e:
                raise self._fail(_translate(e, what, self._label(), self._dir)) from e
            self._arm()
            self._ok()
            return self

    def _open(self, name: str, mode: AccessMode) -> _Attachment:
        """This process's attachment of the segment *name* has now: the one it holds, else a new one."""
        now = backend.name_facts(name) if holds_name(name, mode) else None
        if now is not None:
            att = share_named(name, mode, now[0], now[1])
            if att is not None:
                if not att.foreign or self._key is None:
                    return att
                release_user(att)  # a key names no foreign object: the full attach says so
        att = self._open_new(name, mode)
        register(att)
        return att

    def _open_new(self, name: str, mode: AccessMode) -> _Attachment:
        label = self._label()
        pid = backend.getpid()
        for _ in range(16):
            fd, map_fd, writable, object_size, dev, ino = backend.open_pair(name)
            try:
                if self._key is None:
                    # A native key may name a foreign object: look before locking it.
                    cb = parse_control(backend.pread(fd, PAGE_SIZE, 0), object_size)
                    if cb is None:
                        att = _Attachment(name, fd, writable, mode, foreign=True)
                        map_fd, handed = -1, map_fd  # map() closes it, whatever happens
                        att.map(None, handed)
                        return att
                # Shared first: this waits out a destroyer holding the byte exclusively.
                # Then one read gives the control block as it is now (dead flag
                # included) and the start of the user bytes (the payload header).
                backend.hold_liveness(fd, pid)
                # The name must still be this file: a destroyer may have removed it
                # (and freed its pages) while we waited, and a recycled file may
                # hold another key's segment by now.
                now = backend.name_facts(name)
                if now is None or now[0] != dev or now[1] != ino:
                    backend.close(map_fd)
                    backend.close(fd)
                    continue
                raw, cb = _read_control(fd, now[2])
                if cb is None:
                    raise UnknownShmError(
                        f"attach: {name!r} (for key {label!r}) is not a shmarray segment; "
                        "remove it or use another key", self._key)
                if cb.dead:
                    backend.close(map_fd)
                    backend.close(fd)  # its only reference: the locks go with it
                    continue
                if writable and not cb.persistent and not backend.others_attached(fd) and backend.try_sole(fd):
                    # Nobody else is attached: every attacher died. (try_sole fails,
                    # keeping our shared lock, if someone attached meanwhile.)
                    _retire(fd, name)
                    raise NotFoundError(
                        f"attach: segment {label!r} was left by processes that all died, so it has been "
                        f"removed. {LIFETIME_RULE}", self._key)
                map_fd, handed = -1, map_fd  # map() closes it, whatever happens
                return _attachment_of(name, fd, writable, mode, (dev, ino), raw, cb, handed)
            except BaseException:
                if map_fd >= 0:
                    backend.close(map_fd)
                backend.close(fd)
                raise
        raise NotFoundError(f"attach: segment {label!r} kept disappearing; try again", self._key)

    def _arm(self) -> None:
        """Become one user of ``self._att`` (registered already), with a lock of this object's own."""
        att = self._att
        assert att is not None
        self._lk = SegmentLock(att.gate) if att.gate is not None else None
        own = self._own_fd = []
        self._finalizer = weakref.finalize(self, _drop_user, att, self._lk, own)

    def detach(self) -> bool:
        """Detach; destroys the segment if this was its last attachment (unless persistent).

        Returns False when this object was not attached. Live memoryviews and
        arrays keep working: memory is unmapped when the last of them goes.
        """
        with self._mutex:
            att = self._att
            if att is None:
                return False
            self._att = None
            self._lk = None
            if self._finalizer is not None:
                self._finalizer()  # runs att.close() once
                self._finalizer = None
            self._ok()
            return True

    def unlink(self) -> bool:
        """Remove the name now; existing mappings stay valid. False if it was already gone."""
        with self._mutex:
            name = self._need_name("unlink")
            att = self._att
            try:
                if att is not None:
                    return backend.unlink_if_same(name, att.fd)
                return backend.unlink(name)
            except OSError as e:
                raise self._fail(_translate(e, "unlink", self._label())) from e

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- state -------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        """True while this object is attached."""
        return self._att is not None

    @property
    def size(self) -> int:
        """Usable bytes; 0 when not attached."""
        att = self._att
        return att.size if att is not None else 0

    @property
    def mode(self) -> AccessMode | None:
        """The access mode of the attachment, None when not attached."""
        att = self._att
        return att.mode if att is not None else None

    @property
    def persistent(self) -> bool:
        """True when the attached segment outlives its last detach."""
        att = self._att
        return att.persistent if att is not None else False

    @property
    def is_foreign(self) -> bool:
        """True when attached to a segment without shmarray's control block."""
        att = self._att
        return att.foreign if att is not None else False

    @property
    def data(self) -> memoryview | None:
        """The user bytes (read-only when attached ReadOnly); None when not attached."""
        att = self._att
        return memoryview(att.data_map) if att is not None else None

    @property
    def const_data(self) -> memoryview | None:
        """The user bytes, always read-only; None when not attached."""
        att = self._att
        return memoryview(att.data_map).toreadonly() if att is not None else None

    # -- CUDA pinning ----------------------------------------------------------------

    def pin(self) -> None:
        """Page-lock the data for CUDA (``cudaHostRegister``), so host-to-device copies run at pinned speed.

        Through torch, cupy or libcudart, whichever sees a GPU. Idempotent;
        undone by unpin() or at detach (before the mapping could go). Raises
        CudaUnavailableError (a ShmError and RuntimeError) without CUDA,
        PinError when CUDA refuses.
        """
        from ._cuda import pin_mapping

        with self._mutex:
            att = self._att
            if att is None:
                raise self._fail(NotFoundError(f"pin: segment {self._label()!r} is not attached", self._key))
            if att.pinned is None:
                try:
                    att.pinned = pin_mapping(att.data_map, readonly=att.mode == AccessMode.ReadOnly,
                                             key=self._label())
                except ShmError as e:
                    raise self._fail(e)
                self._ok()

    def unpin(self) -> bool:
        """Unregister what pin() registered; False when it was not pinned."""
        with self._mutex:
            att = self._att
            if att is None or att.pinned is None:
                return False
            pinned, att.pinned = att.pinned, None
            pinned.release()
            return True

    @property
    def is_pinned(self) -> bool:
        """True while pin()ned."""
        att = self._att
        return att is not None and att.pinned is not None

    # -- the lock ---------------------------------------------------------------------

    def _the_lock(self, what: str) -> SegmentLock:
        att = self._att
        if att is None:
            raise self._fail(LockError(
                f"{what}: segment {self._label()!r} is not attached; create() or attach() first", self._key))
        if self._lk is None:
            raise self._fail(LockError(
                f"{what}: segment {self._label()!r} is a foreign segment (no shmarray control "
                "block), so it has no lock; coordinate by other means", self._key))
        return self._lk

    def lock(self, timeout: float | None = None, *, shared: bool = False) -> bool:
        """Take the segment lock; True when held, False when *timeout* seconds ran out.

        None waits forever (Ctrl-C interrupts), 0 tries once. Locking again
        through the object that holds the lock returns True at once. Each
        Segment object is a lock of its own, also against other objects of
        the same segment in this process (views share their root's).
        """
        lk = self._lk
        if lk is None:
            lk = self._the_lock("lock")  # raises the right LockError
        try:
            if lk.acquire(timeout, shared):
                if self._error:
                    self._ok()
                return True
        except ShmError as e:
            raise self._fail(e) from None
        self._fail(LockError(f"lock: timed out after {timeout} s waiting for segment {self._label()!r}", self._key))
        return False

    def unlock(self) -> bool:
        """Release the segment lock; False when this object did not hold it."""
        lk = self._lk
        return lk.release() if lk is not None else False

    def locked(self, timeout: float | None = None, *, shared: bool = False) -> "_Locked":
        """Context manager holding the lock; raises LockError on timeout."""
        timeout = check_timeout(timeout)
        if timeout is None and not shared:
            # The common form is reused: building a manager per use costs more than the lock.
            cm = self._locked_default
            if cm is None:
                cm = self._locked_default = _Locked(self, None, False)
            return cm
        return _Locked(self, timeout, shared)

    def _holds(self) -> Holds:
        """The guard rule over this object's lock (what ``SharedArray.lock()`` returns guards of)."""
        lk = self._lk
        if lk is None:
            lk = self._the_lock("lock")  # raises the right LockError
        holds = lk.holds
        if holds is None:
            holds = lk.holds = Holds(lk)
        return holds

    @property
    def lock_recovered(self) -> bool:
        """True when the last acquisition found that the previous exclusive holder had died holding it."""
        lk = self._lk
        return bool(self._att is not None and lk is not None and lk.recovered)

    @property
    def lock_held(self) -> str | None:
        """'exclusive' or 'shared' while this object holds the lock, else None."""
        lk = self._lk
        return lk.held if self._att is not None and lk is not None else None

    # -- misc ----------------------------------------------------------------------------

    def __repr__(self) -> str:
        name = f"key={self._key!r}" if self._key is not None else f"native_key={self._native!r}"
        if self._att is None:
            return f"<shmarray.Segment {name} detached>"
        mode = "ReadOnly" if self._att.mode == AccessMode.ReadOnly else "ReadWrite"
        extra = " persistent" if self._att.persistent else ""
        extra += " foreign" if self._att.foreign else ""
        return f"<shmarray.Segment {name} size={self._att.size} {mode}{extra}>"

    def _repr_html_(self) -> str:
        """Jupyter's rich display: key, size, mode, persistence, attached processes, lock (see ``_inspect``)."""
        from ._display import facts
        from ._inspect import segment_facts

        return facts("shmarray.Segment", segment_facts(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as a reference to this segment instance: the receiver attaches it.
        att = self._att
        mode = att.mode if att is not None else None
        host, incarnation = self._reference()
        return _rebuild_segment, (self._key, self._native, mode, host, incarnation, self._dir)

    def _open_again(self, held: _Attachment, mode: AccessMode) -> _Attachment:
        """An attachment in *mode* of the instance *held* is attached to (the name may be elsewhere by now)."""
        fd = backend.reopen(held.fd, held.writable_fd)
        try:
            backend.hold_liveness(fd, backend.getpid())
            raw, cb = _read_control(fd, backend.size_of(fd))
            if cb is None or cb.dead:  # pragma: no cover - we hold it attached
                raise NotFoundError(f"attach: segment {self._label()!r} is gone", self._key)
            return _attachment_of(held.name, fd, held.writable_fd, mode, held.ident, raw, cb)
        except BaseException:
            backend.close(fd)
            raise

    # -- the interface of the payload layers (_array, _arrow, _ring, _inspect) ------------------
    #
    # What the layers above may use of a Segment besides its public API (a test checks that they
    # use nothing else): build a segment with a writer (_create), its size rules (_boundary,
    # _no_space), its memory (_mapping, _root, _head, _cache), a description of its own for
    # byte-range locks (_lock_fd), the guard rule of its lock (_holds), what a reference names (_reference, _of_instance, _dir) and the
    # identity its listing reads (_ident). The segment lock is the public lock()/unlock().

    def _create(
        self,
        size: int,
        mode: AccessMode = AccessMode.ReadWrite,
        *,
        persistent: bool = False,
        permissions: int = 0o600,
        fill: Callable[[Callable[[memoryview, int], None]], None] | None = None,
        reserve: bool = True,
    ) -> Segment:
        """create(), with *fill* called before the segment is published.

        *fill* receives ``write(data, offset)``, which writes into the user
        bytes through the fd (faster than faulting fresh pages through a
        mapping). With ``reserve=False`` pages are not pre-allocated; *fill*
        must then write every page it wants reserved (ENOSPC surfaces there).
        """
        with self._mutex:
            what = "create"
            try:
                size = _check_size(size, f"create segment {self._label()!r}")
                mode = AccessMode(mode)
            except ShmError as e:
                raise self._fail(e) from None
            name = self._need_name(what)
            if self._att is not None:
                raise self._fail(AlreadyExistsError(
                    f"create: this object is already attached to segment {self._label()!r}; "
                    "detach() it first", self._key))
            total = PAGE_SIZE + size
            _stash.maybe_reap(self._dir)
            free = backend.free_bytes(self._dir)
            if total > free:
                # Memory kept for reuse gives way before a create fails for lack of room.
                _stash.give_back(total - free, self._dir)
                if total > backend.free_bytes(self._dir):
                    raise self._fail(self._no_space(total))
            for attempt in (1, 2):
                try:
                    self._att = self._build(name, size, mode, persistent, permissions, fill, reserve)
                    register(self._att)
                    break
                except ShmError as e:
                    raise self._fail(e) from None
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EFBIG):
                        if attempt == 1 and _stash.give_back(total, self._dir) > 0:
                            continue
                        raise self._fail(self._no_space(total)) from e
                    raise self._fail(_translate(e, what, self._label(), self._dir)) from e
            self._arm()
            self._ok()
            return self

    def _boundary(self) -> tuple[int, int] | None:
        """(user offset of the first 2 MiB boundary of the file, 2 MiB) where huge pages back segments, else None."""
        if backend.huge_pages(self._dir) is None:
            return None
        return backend.HUGE_PAGE - PAGE_SIZE, backend.HUGE_PAGE

    def _no_space(self, total: int, what: str = "create") -> OutOfResourcesError:
        """The out-of-space error for a segment of *total* bytes (control page included) here."""
        return no_space(what, self._label(), self._key, self._dir, total)

    def _attached(self) -> _Attachment:
        att = self._att
        if att is None:
            raise NotFoundError(f"segment {self._label()!r} is not attached", self._key)
        return att

    def _mapping(self) -> Any:
        """The data mmap (for layers above that build views on it)."""
        return self._attached().data_map

    def _root(self) -> Any:
        """The uint8 ndarray over the user bytes that array views are built on (see _Attachment.root)."""
        return self._attached().root()

    def _cache(self) -> dict[str, Any]:
        """A dict the payload layers fill once per attachment (it goes with the attachment)."""
        return self._attached().cache

    def _head(self) -> bytes:
        """The first bytes of the user area as read at attach (b"" when not read)."""
        att = self._att
        return att.head if att is not None else b""

    def _lock_fd(self) -> int:
        """A description of this object's own (for byte-range locks of the payload layers).

        OFD locks belong to a description, and the attachment's is shared by
        every user in this process: a ring's slot locks must tell two rings
        of one process apart. Opened on first use, closed at detach.
        """
        with self._mutex:
            att = self._att
            own = self._own_fd
            if att is None or own is None:
                raise NotFoundError(f"segment {self._label()!r} is not attached", self._key)
            if not own or own[1] != backend.getpid():
                if own:  # inherited through fork: the parent's description
                    backend.close(own[0])
                    own.clear()
                try:
                    own.extend((backend.reopen(att.fd, att.writable_fd), backend.getpid()))
                except OSError as e:
                    raise self._fail(_translate(e, "attach", self._label(), self._dir)) from e
            return own[0]

    def _reference(self) -> tuple[int, int]:
        """(host, incarnation): what a pickled reference names besides the key (0, 0 when detached)."""
        att = self._att
        if att is None:
            return 0, 0
        return backend.host_identity(self._dir), att.incarnation

    @classmethod
    def _of_instance(cls, key: str | None, native: str | None, mode: AccessMode, host: int,
                     incarnation: int, dir: str | None = None) -> Segment:
        """A new Segment object attached to the segment instance a reference names.

        In a process that holds that instance (any Segment, array or view of
        it) nothing is opened or mapped: the object becomes one more user of
        the attachment. Otherwise the key is attached and must still name
        the same instance. Raises ShmError for a reference made on another
        host (another boot or another /dev/shm), NotFoundError when the
        instance is gone or the key now names another segment.
        """
        label = key if key is not None else native
        if host and host != _host_of(dir):
            raise ShmError(
                f"segment {label!r} lives on another host (or another /dev/shm): its reference was "
                "made where this process cannot map it; send the data by value there "
                "(np.asarray(a) pickles the bytes)", key)
        seg = cls.__new__(cls)
        seg._mutex = threading.RLock()
        seg._key = key
        seg._dir = dir
        if incarnation:
            att = share_instance(incarnation, mode)
            if att is not None:
                seg._dir, seg._native = backend.split_name(att.name)
                seg._att = att
                seg._arm()
                return seg
        seg._native = native_key_for(key) if key is not None else check_native_key(native or "")
        if incarnation:
            held = held_instance(incarnation)
            if held is not None:  # held in the other mode: a new description of the same file
                try:
                    att = seg._open_again(held, mode)
                except OSError as e:
                    raise seg._fail(_translate(e, "attach", label)) from e
                register(att)
                seg._att = att
                seg._arm()
                return seg
        try:
            seg.attach(mode)
        except NotFoundError:
            if not incarnation:
                raise
            raise seg._fail(NotFoundError(
                f"the segment {label!r} that this reference refers to is gone or was replaced: nothing "
                f"has that key now (the last process holding it detached or exited before the reference "
                f"was used). {LIFETIME_RULE}", key)) from None
        att = seg._att
        if incarnation and att is not None and att.incarnation != incarnation:
            seg.detach()
            raise seg._fail(NotFoundError(
                f"the segment {label!r} that this reference refers to is gone or was replaced: the key "
                "now names another segment; the reference cannot be used", key))
        return seg

    def _ident(self) -> tuple[int, int] | None:
        """(device, inode) of the attached shmarray segment's file, for /proc/locks; None when there is none."""
        att = self._att
        if att is None or att.foreign or att.closed:
            return None
        try:
            return backend.identity(att.fd)
        except OSError:  # detached meanwhile by another thread
            return None


def _read_control(fd: int, object_size: int) -> tuple[bytes, ControlBlock | None]:
    """One pread: the control block as it is now and the first HEAD_BYTES of the user area."""
    raw = backend.pread(fd, PAGE_SIZE + HEAD_BYTES, 0)
    return raw, parse_control(raw[:PAGE_SIZE], object_size)


def _attachment_of(name: str, fd: int, writable: bool, mode: AccessMode, ident: tuple[int, int],
                   raw: bytes, cb: ControlBlock, map_fd: int | None = None) -> _Attachment:
    """The attachment over *fd* (liveness held), mapped; *map_fd* is kept or closed by map()."""
    att = _Attachment(name, fd, writable, mode, foreign=False)
    att.ident = ident
    att.head = raw[cb.data_offset :]
    att.map(cb, map_fd)
    return att


def _drop_user(att: _Attachment, lk: SegmentLock | None, own: list[int]) -> None:
    """A Segment object is done (detach() or collected): its lock and its own description go, then its use."""
    mine = att.pid == backend.getpid()
    if lk is not None and lk._held and mine:
        lk.release()
    if own:
        backend.close(own[0])
        own.clear()
    if mine:
        release_user(att)


def _rebuild_segment(key: str | None, native: str | None, mode: AccessMode | None,
                     host: int = 0, incarnation: int = 0, dir: str | None = None) -> Segment:
    if special():
        return rebuild_specially(  # type: ignore[no-any-return]
            _rebuild_segment, (key, native, mode, host, incarnation, dir), key if key is not None else native, host)
    if mode is None:
        return Segment(key, dir=dir) if key is not None else Segment(native_key=native, dir=dir)
    return Segment._of_instance(key, native, mode, host, incarnation, dir)


def _host_of(directory: str | None) -> int:
    """This process's host identity for segments of *directory* (0 when it has no such directory)."""
    try:
        return backend.host_identity(directory)
    except OSError:
        return 0


def check_usable(directory: str, what: str, *, writable: bool) -> None:
    """ShmError naming *directory* when segments cannot live there (NotFoundError when it is missing)."""
    problem = backend.dir_problem(directory, writable=writable)
    if problem is not None:
        cls = NotFoundError if not backend.name_facts(directory) else ShmError
        raise cls(f"{what}: the segment directory {directory!r} {problem}", None)


def _check_dir(directory: "str | os.PathLike[str]") -> str | None:
    """A ``dir=`` argument as segments keep it: None for the default directory."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"dir must be a path (str or os.PathLike), not {type(directory).__name__}")
    d = backend.normal_dir(directory)
    return None if d == backend.SHM_DIR else d


Segment.__module__ = "shmarray"


class _Locked:
    """``with seg.locked():`` -- raises LockError on timeout; nests without releasing early.

    Each entry pushes whether it took the lock, each exit pops: only the
    entry that took it releases it.
    """

    __slots__ = ("_seg", "_timeout", "_shared", "_took")

    def __init__(self, seg: Segment, timeout: float | None, shared: bool) -> None:
        # A weak reference: the Segment caches one of these, and a cycle would
        # delay its detach (on the last reference going) until a gc pass.
        self._seg = weakref.ref(seg)
        self._timeout = timeout
        self._shared = shared
        self._took: list[bool] = []

    def __enter__(self) -> Segment:
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
