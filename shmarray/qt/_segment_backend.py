"""A QSharedMemory over a shmarray segment (the default mode): Qt's API and texts, shmarray's rules.

Each object drives one :class:`shmarray.Segment`, so a ``QSharedMemory``
and a ``Segment`` of the same key share one segment: a header, no leak
after a crash, a lock that a dying holder gives back. A Qt key type (a
``QNativeIpcKey``, or any key once ``qt_compat=True``) hands the object on
to :class:`~shmarray.qt._native.QtBackend`.
"""

from __future__ import annotations

import logging

from .._errors import AccessMode, InvalidKeyError, OutOfResourcesError, SharedMemoryError, ShmError
from .._os import native_key_for
from .._segment import Segment
from ._backend import Backend, qstring
from ._keys import QNativeIpcKey, legacy_native_key
from ._native import QtBackend, is_supported

__all__ = ["SegmentBackend"]

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


def _errno_of(exc: BaseException) -> int | None:
    cause = exc.__cause__
    return cause.errno if isinstance(cause, OSError) else None


class SegmentBackend(Backend):
    """One QSharedMemory over a :class:`shmarray.Segment`.

    *qt_keys* (``qt_compat=True``) reads every key as Qt's: such an object
    is here only until a supported Qt key type takes it to Qt mode.
    """

    def __init__(self, *, qt_keys: bool = False) -> None:
        self.qt_keys = qt_keys
        self._key = ""
        self._native = ""
        self._bad_key: InvalidKeyError | None = None
        self._seg = Segment()

    # -- keys ---------------------------------------------------------------------------------------

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

    def set_key(self, key: str) -> Backend:
        if self.qt_keys:
            return self.set_ipc_key(legacy_native_key(key))  # '' gives Qt's empty key of the legacy type
        native = native_key_for(key) if key else ""
        if key != self._key or native != self._native:
            self._rebind(key, native, by_native=False)
        return self

    def set_native_key(self, key: object) -> Backend:
        if self.qt_keys:
            return self.set_ipc_key(QNativeIpcKey(qstring(key, "setNativeKey")))
        if key is not None and not isinstance(key, str):
            raise TypeError(
                f"QSharedMemory.setNativeKey: the key must be a str or a QNativeIpcKey, "
                f"not {type(key).__name__} ({key!r})"
            )
        key = qstring(key, "setNativeKey")
        if key != self._native or self._key:
            self._rebind("", key, by_native=True)
        return self

    def set_ipc_key(self, key: QNativeIpcKey) -> Backend:
        if not is_supported(key.type()):
            self.set_error(SharedMemoryError.KeyError, "QSharedMemory::setNativeKey: unsupported key type")
            return self
        self._seg.detach()
        return QtBackend(key)

    def key(self) -> str:
        return self._key

    def native_key(self) -> str:
        return self._native

    def ipc_key(self) -> QNativeIpcKey:
        # A shmarray segment's POSIX name: a Qt process on it sees our control block first.
        return QNativeIpcKey(self._native, QNativeIpcKey.DefaultTypeForOs)

    def describe(self) -> str:
        return f"key={self._key!r}" if self._key else f"nativeKey={self._native!r}"

    # -- errors -------------------------------------------------------------------------------------

    def _fail(self, call: str, exc: ShmError) -> bool:
        """Record *exc* as Qt would: its code and "QSharedMemory::<call>: <reason>"; False."""
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
        return self.set_error(code, text)

    # -- the segment --------------------------------------------------------------------------------

    def create(self, size: int, mode: AccessMode) -> bool:
        try:
            self._seg.create(size, mode)
        except ShmError as e:
            if isinstance(e, TypeError) and not isinstance(e, InvalidKeyError):  # a size that is not an int
                raise
            return self._fail("create", e)
        self.clear_error()
        return True

    def attach(self, mode: AccessMode) -> bool:
        if self._seg.is_attached:
            return False  # as Qt: error() is left as it was
        try:
            self._seg.attach(mode)
        except ShmError as e:
            return self._fail("attach", e)
        self.clear_error()
        return True

    def detach(self) -> bool:
        return self._seg.detach()

    def is_attached(self) -> bool:
        return self._seg.is_attached

    def size(self) -> int:
        return self._seg.size

    def data(self) -> memoryview | None:
        return self._seg.data

    def const_data(self) -> memoryview | None:
        return self._seg.const_data

    def lock(self, timeout: float | None) -> bool:
        seg = self._seg
        if seg.lock_held is not None:
            _log.warning("QSharedMemory::lock: already locked")
            return True
        if not self._key or not seg.is_attached:
            return self.set_error(SharedMemoryError.LockError, "QSharedMemory::lock: unable to lock")
        try:
            if seg.lock(timeout):
                return True
        except ShmError as e:
            return self._fail("lock", e)
        return self.set_error(SharedMemoryError.LockError, "QSharedMemory::lock: unable to lock (timed out)")

    def unlock(self) -> bool:
        return self._seg.unlock()
