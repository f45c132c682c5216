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
"""

from __future__ import annotations

import logging

from ._errors import (
    AccessMode,
    InvalidKeyError,
    OutOfResourcesError,
    SharedMemoryError,
    ShmError,
)
from ._os import native_key_for
from ._segment import Segment

# Annotation names: inside the class body, AccessMode and SharedMemoryError
# are the class attributes Qt code expects (QSharedMemory.AccessMode.ReadOnly).
_Mode = AccessMode
_Error = SharedMemoryError

__all__ = ["QSharedMemory"]

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

    ``QSharedMemory(key=None, parent=None)`` or ``QSharedMemory(parent)``;
    *parent* (a QObject or anything else) is accepted and ignored.
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

    def __init__(self, key: object = None, parent: object = None) -> None:
        if key is not None and not isinstance(key, str):
            if isinstance(key, (bytes, bytearray, memoryview)):
                raise TypeError(f"QSharedMemory: the key must be a str, not {type(key).__name__} ({key!r})")
            if parent is not None:
                raise TypeError("QSharedMemory(key=None, parent=None): the key must be a str")
            key = None  # QSharedMemory(parent)
        self._error = SharedMemoryError.NoError
        self._error_string = ""
        self._key = ""
        self._native = ""
        self._bad_key: InvalidKeyError | None = None
        self._seg = Segment()
        self.setKey(key)

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
        """Set the platform independent key; the same key is a no-op, else detach first."""
        key = _qstring(key, "setKey")
        native = native_key_for(key) if key else ""
        if key == self._key and native == self._native:
            return
        self._rebind(key, native, by_native=False)

    def setNativeKey(self, key: str | None) -> None:
        """Set the OS name used as is; key() becomes ''. The same native key is a no-op."""
        key = _qstring(key, "setNativeKey")
        if key == self._native and not self._key:
            return
        self._rebind("", key, by_native=True)

    def key(self) -> str:
        """The key set with setKey() or the constructor; '' if none, or after setNativeKey()."""
        return self._key

    def nativeKey(self) -> str:
        """The OS name of the segment ('' when no key is set)."""
        return self._native

    # -- errors ------------------------------------------------------------------

    def error(self) -> _Error:
        """The last error (NoError after a successful create() or attach())."""
        return self._error

    def errorString(self) -> str:
        """A text for the last error, naming the call that failed ('' when there is none)."""
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
        return self._seg.detach()

    def isAttached(self) -> bool:
        """True while attached."""
        return self._seg.is_attached

    def size(self) -> int:
        """The size of the attached segment; 0 when not attached."""
        return self._seg.size

    def data(self) -> memoryview | None:
        """The segment's bytes (read-only after a ReadOnly attach); None when not attached."""
        return self._seg.data

    def constData(self) -> memoryview | None:
        """The segment's bytes, read-only; None when not attached."""
        return self._seg.const_data

    # -- the lock ------------------------------------------------------------------

    def lock(self) -> bool:
        """Lock the segment, waiting as long as another holds it; True once held.

        False (LockError) when not attached or when a native key is set, as
        the reference page says. Locking again through this object returns
        True at once.
        """
        seg = self._seg
        if seg.lock_held is not None:
            _log.warning("QSharedMemory::lock: already locked")
            return True
        if not self._key or not seg.is_attached:
            self._error = SharedMemoryError.LockError
            self._error_string = "QSharedMemory::lock: unable to lock"
            return False
        try:
            return seg.lock()
        except ShmError as e:
            self._set_error("lock", e)
            return False

    def unlock(self) -> bool:
        """Release the lock; False (nothing happens) when this object does not hold it."""
        return self._seg.unlock()

    def __repr__(self) -> str:
        name = f"key={self._key!r}" if self._key else f"nativeKey={self._native!r}"
        state = f"size={self.size()}" if self.isAttached() else "detached"
        return f"<shmarray.qt.QSharedMemory {name} {state}>"
