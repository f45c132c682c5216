"""``QSharedMemory``, the facade: Qt's API over one backend at a time.

The backend is a :class:`~._segment_backend.SegmentBackend` (a shmarray
segment) until a Qt key type arrives, then a :class:`~._native.QtBackend`
(Qt 6's own rules). The facade checks arguments and delegates; which
backend follows a new key is the current backend's answer.
"""

from __future__ import annotations

import weakref
from typing import Any

from .._errors import AccessMode, SharedMemoryError, qt_value
from ._backend import Backend, qstring
from ._keys import QNativeIpcKey, as_key, legacy_native_key, platform_safe_key
from ._native import is_supported, remove
from ._segment_backend import SegmentBackend

__all__ = ["QSharedMemory", "remove_qt_segment"]

# Annotation names: inside the class body, AccessMode and SharedMemoryError
# are the class attributes Qt code expects (QSharedMemory.AccessMode.ReadOnly).
_Mode = AccessMode
_Error = SharedMemoryError


def _access_mode(mode: object, what: str) -> AccessMode:
    mode = qt_value(mode, AccessMode)  # PySide6's / PyQt6's AccessMode too
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (0, 1):
        raise ValueError(
            f"QSharedMemory.{what}: mode must be QSharedMemory.ReadOnly or QSharedMemory.ReadWrite, "
            f"not {mode!r}"
        )
    return AccessMode(mode)


class QSharedMemory:
    """Access to a shared memory segment, as Qt's ``QSharedMemory``.

    ``QSharedMemory(key=None, parent=None, *, qt_compat=False)`` or
    ``QSharedMemory(parent)``. Methods keep Qt's camelCase names and return
    ``bool`` where Qt does; the last failure is in ``error()`` /
    ``errorString()``. ``data()`` is a memoryview (None when not attached).

    Parameters
    ----------
    key : str or QNativeIpcKey, optional
        A str is a shmarray segment (shared with ``shmarray.Segment(key)``),
        or Qt's legacy key with ``qt_compat=True``; a ``QNativeIpcKey`` (ours,
        PySide6's or PyQt6's) puts the object in Qt mode, where a real Qt
        program shares its bytes and lock.
    parent : object, optional
        A QObject or anything else: accepted and ignored.
    qt_compat : bool, optional
        A str key is Qt's legacy key (System V), as ``QSharedMemory("key")``
        in Qt.

    Examples
    --------
    >>> from shmarray.qt import QSharedMemory
    >>> shm = QSharedMemory("doc-qt")
    >>> shm.create(1024)
    True
    >>> shm.lock(); shm.data()[:2] = b"hi"; shm.unlock()
    True
    True
    >>> QSharedMemory("doc-qt").create(1024)
    False
    >>> shm.detach()
    True
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
        self._backend: Backend = SegmentBackend(qt_keys=bool(qt_compat))
        native = as_key(key)
        if native is not None:
            self._use(self._backend.set_ipc_key(native))
            return
        if key is not None and not isinstance(key, str):
            if isinstance(key, (bytes, bytearray, memoryview)) or parent is not None:
                raise TypeError(
                    f"QSharedMemory(key=None, parent=None): the key must be a str or a QNativeIpcKey, "
                    f"not {type(key).__name__} ({key!r})"
                )
            key = None  # QSharedMemory(parent)
        self.setKey(key)

    def _use(self, backend: Backend) -> None:
        """Make *backend* this object's, when a key took the object to another one."""
        if backend is self._backend:
            return
        self._backend = backend
        # ~QSharedMemory: the backend's clean-up (Qt's rules) runs when this object goes.
        weakref.finalize(self, backend.close)

    # -- keys ----------------------------------------------------------------------------------

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
        return self._backend.ipc_key()

    def setKey(self, key: str | None) -> None:
        """Set the platform independent key; the same key is a no-op, else detach first.

        In Qt mode this is Qt's ``setNativeKey(legacyNativeKey(key))``.
        """
        self._use(self._backend.set_key(qstring(key, "setKey")))

    def setNativeKey(self, key: object, type: object = None) -> None:  # noqa: A002 - Qt's name
        """Set the OS name used as is; key() becomes ''. The same native key is a no-op.

        A ``QNativeIpcKey``, or a name with a *type* (``QNativeIpcKey.Type``),
        is Qt 6's setNativeKey: Qt mode. A plain name on an object in Qt mode
        is ``QNativeIpcKey(name)`` (PosixRealtime), as in Qt 6.
        """
        native = as_key(key)
        if native is None and type is not None:
            native = QNativeIpcKey(qstring(key, "setNativeKey"), type)
        elif native is not None and type is not None:
            raise TypeError("QSharedMemory.setNativeKey: a QNativeIpcKey carries its type; pass no type")
        if native is not None:
            self._use(self._backend.set_ipc_key(native))
        else:
            self._use(self._backend.set_native_key(key))

    def key(self) -> str:
        """The key set with setKey() or the constructor; '' if none, or after setNativeKey()."""
        return self._backend.key()

    def nativeKey(self) -> str:
        """The OS name of the segment ('' when no key is set)."""
        return self._backend.native_key()

    # -- errors ----------------------------------------------------------------------------------

    def error(self) -> _Error:
        """The last error (NoError after a successful create() or attach())."""
        return self._backend.error

    def errorString(self) -> str:
        """A text for the last error, naming the call that failed ('' when there is none)."""
        return self._backend.error_string

    # -- create / attach / detach ----------------------------------------------------------------

    def create(self, size: int, mode: _Mode | int = AccessMode.ReadWrite) -> bool:
        """Create a segment of *size* bytes and attach to it; False if it exists (not attached then)."""
        return self._backend.create(size, _access_mode(mode, "create"))

    def attach(self, mode: _Mode | int = AccessMode.ReadWrite) -> bool:
        """Attach to the existing segment; False (error() says why) on failure or when attached."""
        return self._backend.attach(_access_mode(mode, "attach"))

    def detach(self) -> bool:
        """Detach (destroying the segment if this was its last user); False when not attached."""
        return self._backend.detach()

    def isAttached(self) -> bool:
        """True while attached."""
        return self._backend.is_attached()

    def size(self) -> int:
        """The size of the attached segment; 0 when not attached."""
        return self._backend.size()

    def data(self) -> memoryview | None:
        """The segment's bytes (read-only after a ReadOnly attach); None when not attached."""
        return self._backend.data()

    def constData(self) -> memoryview | None:
        """The segment's bytes, read-only; None when not attached."""
        return self._backend.const_data()

    # -- the lock --------------------------------------------------------------------------------

    def lock(self, timeout: float | None = None) -> bool:
        """Lock the segment, waiting as long as another holds it; True once held.

        False (LockError) when not attached or when a native key is set, as
        the reference page says. Locking again through this object returns
        True at once. *timeout* (seconds; not in Qt) gives up after that
        long with False (LockError).

        In Qt mode this is Qt 6's lock: Qt's semaphore, whatever the key
        form, attached or not.
        """
        return self._backend.lock(timeout)

    def unlock(self) -> bool:
        """Release the lock; False (nothing happens) when this object does not hold it."""
        return self._backend.unlock()

    def __repr__(self) -> str:
        state = f"size={self.size()}" if self.isAttached() else "detached"
        return f"<shmarray.qt.QSharedMemory {self._backend.describe()} {state}>"


def remove_qt_segment(key: QNativeIpcKey | Any) -> bool:
    """Remove what Qt leaves for *key* (segment, lock semaphore, key files).

    Qt never removes a POSIX segment on Linux, and a System V one outlives a
    crashed last user: this is the clean-up, for when no process uses it (a
    process still attached keeps its mapping but loses the shared lock).

    Parameters
    ----------
    key : QNativeIpcKey
        The key Qt used (ours, PySide6's or PyQt6's).

    Returns
    -------
    bool
        True when something was removed.
    """
    native = as_key(key)
    if native is None:
        raise TypeError(f"remove_qt_segment: expected a QNativeIpcKey, not {type(key).__name__}")
    return remove(native)


# The public path, for reprs and pickles.
QSharedMemory.__module__ = "shmarray.qt"
remove_qt_segment.__module__ = "shmarray.qt"
