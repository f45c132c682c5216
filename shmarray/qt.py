"""A drop-in for Qt's ``QSharedMemory`` (PyQt/PySide), without Qt.

``from shmarray.qt import QSharedMemory`` behaves as PyQt's page for Qt 4.8's
class documents it: camelCase methods, ``bool`` returns instead of
exceptions, the last failure in ``error()``/``errorString()``, and the
``AccessMode``/``SharedMemoryError`` values as class attributes. Where the
page is silent the facade does what Qt's own implementation does; where
later Qt releases changed course (Qt 6.6+ locks with a native key and
detaches on ``setKey`` of the same key) the page wins.

Each object drives one :class:`shmarray.Segment`, so a ``QSharedMemory`` and
a ``Segment`` of the same key share one segment. On purpose, unlike Qt:

* ``data()`` and ``constData()`` are memoryviews (None when not attached);
  after a ReadOnly attach ``data()`` is read-only, so a write raises
  ``TypeError`` instead of killing the process.
* A segment whose last user crashed is gone, not leaked; a lock holder's
  death releases the lock.
* ``lock()`` is False whenever the object is not attached: the lock belongs
  to a segment (Qt locks its side semaphore once create()/attach() has been
  tried, even when they failed).

Null strings: Qt returns a null ``QString`` from ``key()`` after
``setNativeKey()`` (and from ``key()``/``nativeKey()`` when nothing is set);
PyQt and PySide turn a null ``QString`` into ``''``, and so does this facade.

Qt 6 keys, and real Qt processes. ``QSharedMemory(QNativeIpcKey(...))``,
``setNativeKey(QNativeIpcKey)``, ``setNativeKey(name, type)`` or
``QSharedMemory(key, qt_compat=True)`` put the object in Qt mode: it creates,
attaches, locks and detaches exactly as Qt 6 does for that key type (see
``shmarray._qtnative``), so a C++ or PySide6 program on the same key shares
its bytes and its lock. shmarray's own guarantees (no leak after a crash, a
lock that a dying holder gives back, a header) do not hold there: Qt's
rules do. An object in Qt mode stays in it (``setKey("k")`` then means Qt's
legacy key). :func:`attach_qt` maps such a segment as an ndarray.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Iterator, Literal

import numpy as np

from ._errors import (
    AccessMode,
    InvalidKeyError,
    InvalidSizeError,
    LockError,
    OutOfResourcesError,
    SharedMemoryError,
    ShmError,
    error_class,
    qt_value,
)
from ._os import native_key_for
from ._qtkeys import QNativeIpcKey, as_key, legacy_key_of, legacy_native_key, platform_safe_key
from ._qtnative import QtNative, is_supported, remove as _remove
from ._array import MappedArray
from ._lock import check_timeout
from ._npy import check_dtype, check_shape
from ._segment import Segment

# Annotation names: inside the class body, AccessMode and SharedMemoryError
# are the class attributes Qt code expects (QSharedMemory.AccessMode.ReadOnly).
_Mode = AccessMode
_Error = SharedMemoryError

__all__ = ["QSharedMemory", "QNativeIpcKey", "QtArray", "attach_qt", "remove_qt_segment"]

_log = logging.getLogger("shmarray.qt")

# The reason part of Qt's error strings ("%1: already exists", ...), from
# QSharedMemoryPrivate::setErrorString and QSharedMemory::create/lock.
_REASON = {
    SharedMemoryError.PermissionDenied: "permission denied",
    SharedMemoryError.AlreadyExists: "already exists",
    SharedMemoryError.NotFound: "doesn't exist",
    SharedMemoryError.LockError: "unable to lock",
    SharedMemoryError.OutOfResources: "out of resources",
}


def _qstring(value: object, what: str) -> str:
    """A QString argument: None is the null string (''), anything but str is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"QSharedMemory.{what}: the key must be a str, not {type(value).__name__} ({value!r})")
    return value


def _access_mode(mode: object, what: str) -> AccessMode:
    mode = qt_value(mode, AccessMode)  # PySide6's / PyQt6's AccessMode too
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (0, 1):
        raise ValueError(
            f"QSharedMemory.{what}: mode must be QSharedMemory.ReadOnly or QSharedMemory.ReadWrite, "
            f"not {mode!r}"
        )
    return AccessMode(mode)


def _errno_of(exc: BaseException) -> int | None:
    cause = exc.__cause__
    return cause.errno if isinstance(cause, OSError) else None


class QSharedMemory:
    """Access to a shared memory segment, as Qt's ``QSharedMemory``.

    ``QSharedMemory(key=None, parent=None, *, qt_compat=False)`` or
    ``QSharedMemory(parent)``; *parent* (a QObject or anything else) is
    accepted and ignored. *key* is a str (a shmarray segment, or Qt's legacy
    key with ``qt_compat=True``) or a ``QNativeIpcKey`` (Qt mode; PySide6's
    and PyQt6's keys are taken too).
    """

    AccessMode = AccessMode
    SharedMemoryError = SharedMemoryError

    ReadOnly = AccessMode.ReadOnly
    ReadWrite = AccessMode.ReadWrite

    NoError = SharedMemoryError.NoError
    PermissionDenied = SharedMemoryError.PermissionDenied
    InvalidSize = SharedMemoryError.InvalidSize
    KeyError = SharedMemoryError.KeyError
    AlreadyExists = SharedMemoryError.AlreadyExists
    NotFound = SharedMemoryError.NotFound
    LockError = SharedMemoryError.LockError
    OutOfResources = SharedMemoryError.OutOfResources
    UnknownError = SharedMemoryError.UnknownError

    def __init__(self, key: object = None, parent: object = None, *, qt_compat: bool = False) -> None:
        self._error = SharedMemoryError.NoError
        self._error_string = ""
        self._key = ""
        self._native = ""
        self._bad_key: InvalidKeyError | None = None
        self._seg = Segment()
        self._qt = bool(qt_compat)
        self._q: QtNative | None = None
        native = as_key(key)
        if native is not None:
            self._enter_qt(native)
            return
        if key is not None and not isinstance(key, str):
            if isinstance(key, (bytes, bytearray, memoryview)) or parent is not None:
                raise TypeError(
                    f"QSharedMemory(key=None, parent=None): the key must be a str or a QNativeIpcKey, "
                    f"not {type(key).__name__} ({key!r})"
                )
            key = None  # QSharedMemory(parent)
        self.setKey(key)

    # -- Qt mode ---------------------------------------------------------------------------

    def _enter_qt(self, key: QNativeIpcKey) -> None:
        """Qt's QSharedMemory::setNativeKey(QNativeIpcKey), leaving shmarray mode if needed."""
        state = self._q
        if state is not None and key == state.key and key.isEmpty():
            return
        if not is_supported(key.type()):
            code, text = SharedMemoryError.KeyError, "QSharedMemory::setNativeKey: unsupported key type"
            if state is not None:
                state.error, state.error_string = code, text
            else:
                self._error, self._error_string = code, text
            return
        if state is None:
            self._seg.detach()
            self._seg = Segment()
            self._key = self._native = ""
            self._qt = True
            state = self._q = QtNative(key)
            # ~QSharedMemory: detach, clean up, and remove what this object made (Qt's rules).
            weakref.finalize(self, state.destroy)
        else:
            state.rekey(key)

    @staticmethod
    def platformSafeKey(key: str, type: object = QNativeIpcKey.DefaultTypeForOs) -> QNativeIpcKey:  # noqa: A002
        """Qt 6's portable key: ``"/" + key`` for PosixRealtime, a runtime-dir path for SystemV."""
        return platform_safe_key(key, type)

    @staticmethod
    def legacyNativeKey(key: str, type: object = QNativeIpcKey.legacyDefaultTypeForOs()) -> QNativeIpcKey:  # noqa: A002
        """The key Qt 4.4 to 6.5 derived from *key* (what ``QSharedMemory("key")`` uses in Qt)."""
        return legacy_native_key(key, type)

    @staticmethod
    def isKeyTypeSupported(type: object) -> bool:  # noqa: A002
        """True for SystemV (libc) and PosixRealtime (posix_ipc, for Qt's semaphore) here."""
        kind = qt_value(type, QNativeIpcKey.Type)
        if not isinstance(kind, QNativeIpcKey.Type):
            raise TypeError(f"QSharedMemory.isKeyTypeSupported: expected a QNativeIpcKey.Type, not {kind!r}")
        return is_supported(int(kind))

    def nativeIpcKey(self) -> QNativeIpcKey:
        """The key and its type; for a shmarray segment, its POSIX name (a Qt process sees our header first)."""
        if self._q is not None:
            return QNativeIpcKey(self._q.key)
        return QNativeIpcKey(self._native, QNativeIpcKey.DefaultTypeForOs)

    # -- keys ------------------------------------------------------------------

    def _rebind(self, key: str, native: str, by_native: bool) -> None:
        """Detach, then point this object at a new segment name."""
        self._seg.detach()
        self._key = key
        self._native = native
        self._bad_key = None
        try:
            if not native:
                self._seg = Segment()
            elif by_native:
                self._seg = Segment(native_key=native)
            else:
                self._seg = Segment(key)
        except InvalidKeyError as e:
            # Qt accepts any key here and fails at create()/attach(): so do we.
            self._seg = Segment()
            self._bad_key = e

    def setKey(self, key: str | None) -> None:
        """Set the platform independent key; the same key is a no-op, else detach first.

        In Qt mode this is Qt's ``setNativeKey(legacyNativeKey(key))``.
        """
        key = _qstring(key, "setKey")
        if self._qt:
            self._enter_qt(legacy_native_key(key))  # '' gives Qt's empty key of the legacy type
            return
        native = native_key_for(key) if key else ""
        if key == self._key and native == self._native:
            return
        self._rebind(key, native, by_native=False)

    def setNativeKey(self, key: object, type: object = None) -> None:  # noqa: A002 - Qt's name
        """Set the OS name used as is; key() becomes ''. The same native key is a no-op.

        A ``QNativeIpcKey``, or a name with a *type* (``QNativeIpcKey.Type``),
        is Qt 6's setNativeKey: Qt mode. A plain name on an object in Qt mode
        is ``QNativeIpcKey(name)`` (PosixRealtime), as in Qt 6.
        """
        native = as_key(key)
        if native is None and type is not None:
            native = QNativeIpcKey(_qstring(key, "setNativeKey"), type)
        elif native is None and self._qt:
            native = QNativeIpcKey(_qstring(key, "setNativeKey"))
        elif native is not None and type is not None:
            raise TypeError("QSharedMemory.setNativeKey: a QNativeIpcKey carries its type; pass no type")
        if native is not None:
            self._enter_qt(native)
            return
        if key is not None and not isinstance(key, str):
            raise TypeError(
                f"QSharedMemory.setNativeKey: the key must be a str or a QNativeIpcKey, "
                f"not {_type_name(key)} ({key!r})"
            )
        key = _qstring(key, "setNativeKey")
        if key == self._native and not self._key:
            return
        self._rebind("", key, by_native=True)

    def key(self) -> str:
        """The key set with setKey() or the constructor; '' if none, or after setNativeKey()."""
        if self._q is not None:
            return legacy_key_of(self._q.key)
        return self._key

    def nativeKey(self) -> str:
        """The OS name of the segment ('' when no key is set)."""
        if self._q is not None:
            return self._q.key.nativeKey()
        return self._native

    # -- errors ------------------------------------------------------------------

    def error(self) -> _Error:
        """The last error (NoError after a successful create() or attach())."""
        if self._q is not None:
            return self._q.error
        return self._error

    def errorString(self) -> str:
        """A text for the last error, naming the call that failed ('' when there is none)."""
        if self._q is not None:
            return self._q.error_string
        return self._error_string

    def _clear_error(self) -> None:
        self._error = SharedMemoryError.NoError
        self._error_string = ""

    def _set_error(self, call: str, exc: ShmError) -> None:
        """Record *exc* as Qt would: its code and "QSharedMemory::<call>: <reason>"."""
        code = exc.code
        where = f"QSharedMemory::{call}"
        if code == SharedMemoryError.KeyError:
            if self._bad_key is not None:
                text = f"{where}: bad name ({self._bad_key})"
            elif not self._native:
                text = f"{where}: key is empty"
            else:
                text = f"{where}: bad name ({exc})"
        elif code == SharedMemoryError.InvalidSize:
            # Qt's text, spelling included.
            text = f"{where}: create size is less then 0" if call == "create" else f"{where}: invalid size ({exc})"
        elif code in _REASON:
            text = f"{where}: {_REASON[code]}"
            if isinstance(exc, OutOfResourcesError):
                text += f" ({exc})"
        else:
            number = _errno_of(exc)
            text = f"{where}: unknown error" + (f" {number}" if number is not None else "") + f" ({exc})"
        self._error = code
        self._error_string = text

    # -- create / attach / detach ------------------------------------------------

    def create(self, size: int, mode: _Mode | int = AccessMode.ReadWrite) -> bool:
        """Create a segment of *size* bytes and attach to it; False if it exists (not attached then)."""
        mode = _access_mode(mode, "create")
        if self._q is not None:
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"QSharedMemory.create: size must be an int, not {type(size).__name__}")
            return self._q.create(size, mode)
        try:
            self._seg.create(size, mode)
        except ShmError as e:
            if isinstance(e, TypeError) and not isinstance(e, InvalidKeyError):  # a size that is not an int
                raise
            self._set_error("create", e)
            return False
        self._clear_error()
        return True

    def attach(self, mode: _Mode | int = AccessMode.ReadWrite) -> bool:
        """Attach to the existing segment; False (error() says why) on failure or when attached."""
        mode = _access_mode(mode, "attach")
        if self._q is not None:
            return self._q.attach(mode)
        if self._seg.is_attached:
            return False  # as Qt: error() is left as it was
        try:
            self._seg.attach(mode)
        except ShmError as e:
            self._set_error("attach", e)
            return False
        self._clear_error()
        return True

    def detach(self) -> bool:
        """Detach (destroying the segment if this was its last user); False when not attached."""
        if self._q is not None:
            return self._q.detach()
        return self._seg.detach()

    def isAttached(self) -> bool:
        """True while attached."""
        if self._q is not None:
            return self._q.memory is not None
        return self._seg.is_attached

    def size(self) -> int:
        """The size of the attached segment; 0 when not attached."""
        if self._q is not None:
            return self._q.size
        return self._seg.size

    def data(self) -> memoryview | None:
        """The segment's bytes (read-only after a ReadOnly attach); None when not attached."""
        if self._q is not None:
            return self._q.data(self._q.mode == AccessMode.ReadOnly)
        return self._seg.data

    def constData(self) -> memoryview | None:
        """The segment's bytes, read-only; None when not attached."""
        if self._q is not None:
            return self._q.data(True)
        return self._seg.const_data

    # -- the lock ------------------------------------------------------------------

    def lock(self, timeout: float | None = None) -> bool:
        """Lock the segment, waiting as long as another holds it; True once held.

        False (LockError) when not attached or when a native key is set, as
        the reference page says. Locking again through this object returns
        True at once. *timeout* (seconds; not in Qt) gives up after that
        long with False (LockError).

        In Qt mode this is Qt 6's lock: Qt's semaphore, whatever the key
        form, attached or not.
        """
        if self._q is not None:
            return self._q.lock(check_timeout(timeout))
        seg = self._seg
        if seg.lock_held is not None:
            _log.warning("QSharedMemory::lock: already locked")
            return True
        if not self._key or not seg.is_attached:
            self._error = SharedMemoryError.LockError
            self._error_string = "QSharedMemory::lock: unable to lock"
            return False
        try:
            if seg.lock(timeout):
                return True
        except ShmError as e:
            self._set_error("lock", e)
            return False
        self._error = SharedMemoryError.LockError
        self._error_string = "QSharedMemory::lock: unable to lock (timed out)"
        return False

    def unlock(self) -> bool:
        """Release the lock; False (nothing happens) when this object does not hold it."""
        if self._q is not None:
            return self._q.unlock()
        return self._seg.unlock()

    def __repr__(self) -> str:
        if self._q is not None:
            name = f"nativeIpcKey={self._q.key!r}"
        else:
            name = f"key={self._key!r}" if self._key else f"nativeKey={self._native!r}"
        state = f"size={self.size()}" if self.isAttached() else "detached"
        return f"<shmarray.qt.QSharedMemory {name} {state}>"


def _type_name(value: object) -> str:
    return type(value).__name__


def remove_qt_segment(key: QNativeIpcKey | Any) -> bool:
    """Remove what Qt leaves for *key* (segment, lock semaphore, key files); True when something went.

    Qt never removes a POSIX segment on Linux, and a System V one outlives a
    crashed last user: this is the clean-up, for when no process uses it
    (a process still attached keeps its mapping but loses the shared lock).
    """
    native = as_key(key)
    if native is None:
        raise TypeError(f"remove_qt_segment: expected a QNativeIpcKey, not {type(key).__name__}")
    return _remove(native)


# -- Qt segments as ndarrays ----------------------------------------------------------------------------

class QtArray(MappedArray):
    """An ndarray over a Qt segment's bytes, made by :func:`attach_qt`; ``.qt`` is its QSharedMemory.

    Views (slices, reshapes, ``.view()``) are QtArrays of the same segment;
    results that live elsewhere (ufunc outputs, ``.copy()``) are plain
    ndarrays (numpy.memmap's model, as SharedArray). It pickles by value, as
    a plain ndarray. The mapping lives as long as any view of it, even past
    ``detach()``.
    """

    qt: QSharedMemory | None = None
    _HOME = ("qt",)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return np.asarray(self).copy().__reduce_ex__(protocol)

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def _memory(self) -> QSharedMemory:
        if self.qt is None:
            raise LockError("this array is not a view of a Qt segment")
        return self.qt

    def lock(self, timeout: float | None = None) -> bool:
        """Take Qt's lock of the segment (its semaphore); False when *timeout* seconds ran out."""
        return self._memory().lock(timeout)

    def unlock(self) -> bool:
        """Release Qt's lock; False when this array's QSharedMemory does not hold it."""
        return self._memory().unlock()

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[QtArray]:
        """Hold Qt's lock for the block; raises LockError when *timeout* seconds run out."""
        memory = self._memory()
        if not memory.lock(timeout):
            raise LockError(f"{memory.errorString()} ({memory.nativeKey()!r})")
        try:
            yield self
        finally:
            memory.unlock()


def attach_qt(
    key: str | QNativeIpcKey | Any,
    dtype: Any,
    shape: int | tuple[int, ...] | None = None,
    *,
    offset: int = 0,
    mode: AccessMode | int = AccessMode.ReadWrite,
    legacy: bool = False,
    order: Literal["C", "F"] = "C",
) -> QtArray:
    """Attach a segment a Qt program made, as an ndarray of *dtype* and *shape* at byte *offset*.

    *key* is a ``QNativeIpcKey`` (ours or PySide6's/PyQt6's), or a str: Qt 6's
    ``QSharedMemory.platformSafeKey(key)`` (PosixRealtime, ``/dev/shm/<key>``),
    or with ``legacy=True`` Qt's legacy key (``QSharedMemory("key")`` in Qt,
    System V). *shape* None takes as many items as fit after *offset*. The
    segment holds no header: the caller says what it holds. Lock with
    ``arr.locked()`` (Qt's semaphore). Raises NotFoundError and the other
    ShmErrors on failure, with Qt's error text.
    """
    if isinstance(key, str):
        key = QSharedMemory.legacyNativeKey(key) if legacy else QSharedMemory.platformSafeKey(key)
    native = as_key(key)
    if native is None:
        raise TypeError(f"attach_qt: key must be a str or a QNativeIpcKey, not {type(key).__name__}")
    dt = check_dtype(dtype, "attach_qt")
    dims = None if shape is None else check_shape(shape, "attach_qt")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidSizeError(f"attach_qt: offset must be an int >= 0, not {offset!r}", None)
    memory = QSharedMemory(native)
    if not memory.attach(mode):
        raise error_class(memory.error())(f"{memory.errorString()} ({native.nativeKey()!r})", native.nativeKey())
    size = memory.size()
    if dims is None:  # as many items as fit after offset
        dims = (max(0, size - offset) // dt.itemsize if dt.itemsize else 0,)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if offset + nbytes > size:
        memory.detach()
        raise InvalidSizeError(
            f"attach_qt: {dims} of {dt} at offset {offset} needs {offset + nbytes} bytes; "
            f"the segment {native.nativeKey()!r} has {size}", native.nativeKey())
    buffer = memory.data()
    assert buffer is not None
    array = np.ndarray(dims, dtype=dt, buffer=buffer, offset=offset, order=order).view(QtArray)
    array.qt = memory
    return array


attach_qt.__module__ = "shmarray"
QtArray.__module__ = "shmarray"
