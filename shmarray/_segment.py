"""Segment: the QSharedMemory-shaped handle on a named segment.

What a user holds: a key (or native key) and directory, create / attach /
detach as calls, Qt's error state (``error``, ``error_string``), the lock,
pinning and the memory accessors. Every sequence behind those calls (build,
publish, open, recycle, retire) is ``_lifecycle``'s; the OS resources of an
attachment and who destroys a segment are ``_attachment``'s; the control
block's bytes are ``_control``'s. The payload layers (arrays, tables,
rings, the listing) use what :class:`SegmentService` declares, besides the
public API.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from . import _lifecycle
from ._attachment import _Attachment, release_user
from ._control import PAGE_SIZE
from ._display import human as _human
from ._errors import (
    AccessMode,
    AlreadyExistsError,
    InvalidKeyError,
    LockError,
    NotFoundError,
    OutOfResourcesError,
    SharedMemoryError,
    ShmError,
    UnknownShmError,
)
from ._lifecycle import Dir, Fill, Where, check_dir, check_size, no_space
from ._lock import Holds, SegmentLock, SegmentLocked, segment_lock, segment_unlock
from ._os import backend, check_key, check_native_key, native_key_for
from ._reference import Reference, attach_instances_with, rebuild, reduce
from ._wait import check_timeout

__all__ = ["Segment", "SegmentService", "Dir", "segment_facts"]


class SegmentService(Protocol):
    """What the payload layers (``_array``, ``_arrow``, ``_ring``, ``_torch``, ``_inspect``) may use of a
    Segment besides its public API: the one declaration (``tests/test_layers.py`` holds them to it).

    Build a segment with a writer (``_create``) and its size rules
    (``_boundary``, ``_no_space``); its memory (``_mapping``, ``_root``,
    ``_head``, ``_cache``); a description of its own for byte-range locks
    (``_lock_fd``) and the guard rule of its lock (``_holds``); what a
    reference names (``_reference``, ``_dir``; ``Segment._of_instance``
    attaches it back); the identity its listing reads (``_ident``).
    """

    _dir: str | None

    def _create(self, size: int, mode: AccessMode = ..., *, persistent: bool = ..., permissions: int = ...,
                fill: Fill | None = ..., reserve: bool = ...) -> Segment: ...
    def _publish_block(self, size: int, block_fd: int, source: str, head: bytes, room: int, *,
                       persistent: bool = ...) -> Segment: ...
    def _boundary(self) -> tuple[int, int] | None: ...
    def _no_space(self, total: int, what: str = ...) -> OutOfResourcesError: ...
    def _mapping(self) -> Any: ...
    def _root(self) -> Any: ...
    def _head(self) -> bytes: ...
    def _cache(self) -> dict[str, Any]: ...
    def _lock_fd(self) -> int: ...
    def _holds(self, what: str = ...) -> Holds: ...
    def _reference(self) -> tuple[int, int]: ...
    def _ident(self) -> tuple[int, int] | None: ...
    # A constructor, declared for the test: Segment._of_instance(key, native, mode, host, incarnation, dir).
    def _of_instance(self, key: str | None, native: str | None, mode: AccessMode, host: int,
                     incarnation: int, dir: str | None = ...) -> Segment: ...


class Segment:
    """A named shared-memory segment, modelled on Qt's QSharedMemory.

    ``Segment(key)`` derives a native (OS) name from *key*;
    ``Segment(native_key=...)`` uses an OS name as is (e.g. a
    ``multiprocessing.shared_memory`` segment, which ``detach()`` then never
    removes). Nothing is opened until :meth:`create` or :meth:`attach`.
    Failures raise :class:`ShmError` subclasses; ``error``/``error_string``
    keep the last error as Qt does. The segment lives while some ``Segment``
    anywhere is attached to it (unless created persistent); a forked child
    that inherits an attached Segment is attached in its own right.

    Parameters
    ----------
    key : str, optional
        The segment's key: any non-empty str of at most 1024 characters
        without NUL; it lives in ``shmarray_<readable part>_<hash>``.
    native_key : str, optional
        An OS name to use as is, instead of *key*.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Raises
    ------
    ValueError
        When both *key* and *native_key* are given.
    InvalidKeyError
        For a key or native key that cannot name a segment.

    Examples
    --------
    >>> from shmarray import Segment, AccessMode
    >>> seg = Segment("doc-segment").create(1 << 16)
    >>> seg.data[:5] = b"hello"
    >>> with Segment("doc-segment").attach(AccessMode.ReadOnly) as view:
    ...     bytes(view.data[:5])
    b'hello'
    >>> seg.detach()
    True
    """

    # Defaults at class level, so detach() and __del__ work on a half-built object.
    _key: str | None = None
    _native: str | None = None
    _dir: str | None = None  # the segment directory; None: the default (SHMARRAY_DIR or /dev/shm)
    _att: _Attachment | None = None
    _finalizer: Any = None
    _lk: SegmentLock | None = None  # this object's lock (through its attachment's gate), for the hot path
    _own_fd: "list[int] | None" = None  # a description of this object's own, for byte-range locks
    _locked_default: "SegmentLocked | None" = None
    _error: SharedMemoryError = SharedMemoryError.NoError
    _error_string: str = ""

    def __init__(self, key: str | None = None, *, native_key: str | None = None,
                 dir: Dir = None) -> None:
        if key is not None and native_key is not None:
            raise ValueError("pass key or native_key, not both")
        if dir is not None:
            self._dir = check_dir(dir)
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
        lk = self._lk
        if lk is not None:
            lk.error_set = True  # the lock's fast path clears the error state again on success
        # Raised again from the public method: the frames below it are internals.
        return exc.with_traceback(None)

    def _where(self) -> Where:
        return Where(self._key, self._dir, self._label())

    def _need_name(self, what: str) -> str:
        if self._native is None:
            raise self._fail(InvalidKeyError(f"{what}: no key set; pass a key to Segment() or set_key()"))
        if self._dir is not None:
            try:
                _lifecycle.check_usable(self._dir, what, writable=what == "create")
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
        """Create a new segment of *size* usable bytes (zero-filled) and attach to it.

        Parameters
        ----------
        size : int
            Usable bytes (> 0). The pages are reserved now.
        mode : AccessMode, optional
            How this object maps it (default ReadWrite).
        persistent : bool, optional
            Keep the segment after its last detach, until ``shmarray.unlink(key)``.
        permissions : int, optional
            The segment file's mode (default 0o600: your user only).

        Returns
        -------
        Segment
            This object, attached.

        Raises
        ------
        AlreadyExistsError
            When a live segment has the key.
        OutOfResourcesError
            When the directory has no room (says how much is free): never a
            SIGBUS later.
        InvalidSizeError
            For a size <= 0 or too large.
        """
        return self._create(size, mode, persistent=persistent, permissions=permissions)

    def attach(self, mode: AccessMode = AccessMode.ReadWrite) -> Segment:
        """Attach to an existing segment.

        Parameters
        ----------
        mode : AccessMode, optional
            ReadWrite (the default), or ReadOnly: then ``data`` is a read-only
            memoryview.

        Returns
        -------
        Segment
            This object, attached.

        Raises
        ------
        NotFoundError
            When there is no such segment.
        PermissionDeniedError
            When the file's permissions forbid it.
        """
        with self._mutex:
            try:
                mode = AccessMode(mode)
            except ValueError as e:
                raise self._fail(UnknownShmError(f"attach: invalid access mode {mode!r}")) from e
            name = self._need_name("attach")
            if self._att is not None:
                raise self._fail(AlreadyExistsError(
                    f"attach: this object is already attached to segment {self._label()!r}; "
                    "detach() it first", self._key))
            try:
                self._att = _lifecycle.attach(self._where(), name, mode)
            except ShmError as e:
                raise self._fail(e) from None
            self._arm()
            self._ok()
            return self

    def _arm(self) -> None:
        """Become one user of ``self._att`` (registered already), with a lock of this object's own."""
        att = self._att
        assert att is not None
        self._lk = SegmentLock(att.gate) if att.gate is not None else None
        own = self._own_fd = []
        self._finalizer = weakref.finalize(self, _drop_user, att, self._lk, own)

    def detach(self) -> bool:
        """Detach; destroys the segment if this was its last attachment (unless persistent).

        Live memoryviews and arrays keep working: memory is unmapped when the
        last of them goes.

        Returns
        -------
        bool
            False when this object was not attached.
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
        """Remove the name now; existing mappings stay valid.

        Returns
        -------
        bool
            False if it was already gone.
        """
        with self._mutex:
            name = self._need_name("unlink")
            try:
                return _lifecycle.unlink(self._where(), name, self._att)
            except ShmError as e:
                raise self._fail(e) from None

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
        undone by :meth:`unpin` or at detach (before the mapping could go).

        Raises
        ------
        CudaUnavailableError
            Without CUDA (a ShmError and RuntimeError, naming what was tried).
        PinError
            When CUDA refuses the registration.
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

    # lock() and unlock(): their common case runs in one Python call, so their code is the
    # lock's (``_lock.segment_lock``, ``segment_unlock``); the rest comes here.
    lock = segment_lock
    unlock = segment_unlock

    def _lock_slow(self, timeout: float | None, shared: bool) -> bool:
        """``lock()`` beyond its common case: timeouts, the shared mode, the first lock, Qt's error state."""
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

    def locked(self, timeout: float | None = None, *, shared: bool = False) -> SegmentLocked:
        """Context manager holding the lock; raises LockError on timeout."""
        timeout = check_timeout(timeout)
        if timeout is None and not shared:
            # The common form is reused: building a manager per use costs more than the lock.
            cm = self._locked_default
            if cm is None:
                cm = self._locked_default = SegmentLocked(self, None, False)
            return cm
        return SegmentLocked(self, timeout, shared)

    def _holds(self, what: str = "lock") -> Holds:
        """The guard rule over this object's lock (what ``SharedArray.lock()`` returns guards of)."""
        lk = self._lk
        if lk is None:
            lk = self._the_lock(what)  # raises the right LockError
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
        return facts("shmarray.Segment", segment_facts(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as a reference to this segment instance (a detached one: to its key): the receiver attaches it.
        att = self._att
        return reduce(_rebuild_segment, Reference.to(self, att.mode if att is not None else None))

    # -- the service of the payload layers: what SegmentService declares -------------------------

    def _create(
        self,
        size: int,
        mode: AccessMode = AccessMode.ReadWrite,
        *,
        persistent: bool = False,
        permissions: int = 0o600,
        fill: Fill | None = None,
        reserve: bool = True,
    ) -> Segment:
        """create(), with *fill* called before the segment is published.

        *fill* receives ``write(data, offset)``, which writes into the user
        bytes through the fd (faster than faulting fresh pages through a
        mapping). With ``reserve=False`` pages are not pre-allocated; *fill*
        must then write every page it wants reserved (ENOSPC surfaces there).
        """
        with self._mutex:
            try:
                size = check_size(size, f"create segment {self._label()!r}")
                mode = AccessMode(mode)
            except ShmError as e:
                raise self._fail(e) from None
            name = self._need_name("create")
            if self._att is not None:
                raise self._fail(AlreadyExistsError(
                    f"create: this object is already attached to segment {self._label()!r}; "
                    "detach() it first", self._key))
            try:
                self._att = _lifecycle.create(self._where(), name, size, mode, persistent, permissions, fill,
                                              reserve)
            except ShmError as e:
                raise self._fail(e) from None
            self._arm()
            self._ok()
            return self

    def _publish_block(self, size: int, block_fd: int, source: str, head: bytes, room: int, *,
                       persistent: bool = False) -> Segment:
        """Publish a file whose data is in place (an ``allocating()`` array's) as this segment, attached."""
        with self._mutex:
            name = self._need_name("share")
            if self._att is not None:
                raise self._fail(AlreadyExistsError(
                    f"share: this object is already attached to segment {self._label()!r}", self._key))
            try:
                self._att = _lifecycle.publish_block(self._where(), name, block_fd, source, size, persistent,
                                                     head, room)
            except ShmError as e:
                raise self._fail(e) from None
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
                    raise self._fail(UnknownShmError(f"attach: segment {self._label()!r}: {e}", self._key)) from e
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
        seg = cls.__new__(cls)
        seg._mutex = threading.RLock()
        seg._key = key
        seg._dir = dir
        seg._native = native if key is None else None
        try:
            att = _lifecycle.attach_instance(Where(key, dir, key if key is not None else native), native, mode,
                                             host, incarnation)
        except ShmError as e:
            raise seg._fail(e) from None
        # The attachment's own name: the segment may live where the reference did not say.
        seg._dir, seg._native = backend.split_name(att.name)
        seg._att = att
        seg._arm()
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


def _drop_user(att: _Attachment, lk: SegmentLock | None, own: list[int]) -> None:
    """A Segment object is done (detach() or collected): its lock and its own description go, then its use."""
    mine = att.pid == backend.getpid()
    if lk is not None:
        lk.close()  # releases what this object holds (in the process that took it), closes its description
    if own:
        backend.close(own[0])
        own.clear()
    if mine:
        release_user(att)


def _rebuild_segment(fields: tuple[Any, ...], detail: Any = ()) -> Segment:
    """Unpickle a Segment reference (``_reference``)."""
    return rebuild(_rebuild_segment, _segment_of, fields, detail)  # type: ignore[no-any-return]


def _segment_of(seg: Segment | None, ref: Reference, detail: Any) -> Segment:
    if seg is not None:
        return seg
    # A detached Segment pickles as its key: the receiver gets one, detached too.
    return Segment(ref.key, dir=ref.dir) if ref.key is not None else Segment(native_key=ref.native, dir=ref.dir)


def segment_facts(seg: Segment) -> list[tuple[str, str]]:
    """What a Segment object's rich display shows: (name, value) rows, plain text."""
    rows = [("key", repr(seg.key))] if seg.key is not None else []
    rows.append(("native name", f"/{seg.native_key}" if seg.native_key is not None else "-"))
    if not seg.is_attached:
        rows.append(("state", "detached"))
        return rows
    rows.append(("size", f"{_human(seg.size)} ({seg.size:,} bytes)"))
    rows.append(("mode", "ReadOnly" if seg.mode == AccessMode.ReadOnly else "ReadWrite"))
    if seg.is_foreign:
        rows.append(("foreign", "no shmarray control block: no lock, never removed by detach"))
        return rows
    rows.append(("persistent", "yes: stays until shmarray.unlink(key)" if seg.persistent
                 else "no: goes with its last user"))
    ident = seg._ident()
    try:
        live = None if ident is None else backend.lock_report(*ident)
    except OSError:
        live = None
    if live is None:
        rows.append(("attached", "unknown"))
        return rows
    pids, attachments, mode, holder = sorted(live[0]), live[1], live[2], live[3]
    me = backend.getpid()
    who = ", ".join(f"{p} (this process)" if p == me else str(p) for p in pids)
    text = f"{len(pids)} process{'es' if len(pids) != 1 else ''}: {who}" if pids else "none"
    if attachments != len(pids):
        text += f" ({attachments} attachments)"
    rows.append(("attached", text))
    held = seg.lock_held
    if held is not None:
        lock = f"{held}, held by this object"
    elif mode is None:
        lock = "free"
    elif mode == "exclusive":
        lock = f"exclusive, held by pid {holder}" if holder is not None else "exclusive"
    else:
        lock = "shared (readers)"
    rows.append(("lock", lock))
    if seg.lock_recovered:
        rows.append(("lock recovered", "yes: the previous holder died holding it; check the data"))
    return rows


Segment.__module__ = "shmarray"
attach_instances_with(Segment._of_instance)
