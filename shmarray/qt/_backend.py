"""What a ``QSharedMemory`` does, whatever makes the segment: the abstract backend.

Two backends implement it: :class:`~shmarray.qt._segment_backend.SegmentBackend`
(a shmarray segment, the default) and :class:`~shmarray.qt._native.QtBackend`
(Qt 6's own state machine, for a Qt key type). The facade holds one and
delegates every call; a key of the other kind makes the backend hand back
its successor (``set_key``/``set_native_key``/``set_ipc_key`` return the
backend to use from then on), so the rules for switching live with the
backends, not in the facade.

The backend owns Qt's error state, ``error`` and ``error_string``, written
only by :meth:`Backend.set_error` and :meth:`Backend.clear_error`.
"""

from __future__ import annotations

import abc

from .._errors import AccessMode, SharedMemoryError
from ._keys import QNativeIpcKey

__all__ = ["Backend", "qstring"]


def qstring(value: object, what: str) -> str:
    """A QString argument: None is the null string (''), anything but str is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"QSharedMemory.{what}: the key must be a str, not {type(value).__name__} ({value!r})")
    return value


class Backend(abc.ABC):
    """One QSharedMemory's segment and its last error; bool returns and Qt's texts, as the facade's."""

    # Class-level defaults: a backend whose __init__ failed still answers error() (and a fresh one
    # starts with NoError, as Qt's QSharedMemoryPrivate does).
    error: SharedMemoryError = SharedMemoryError.NoError
    error_string: str = ""

    # -- the error state ------------------------------------------------------------------------

    def set_error(self, code: SharedMemoryError, text: str) -> bool:
        """Record a failure; False, so that a failing call can ``return self.set_error(...)``."""
        self.error = code
        self.error_string = text
        return False

    def clear_error(self) -> None:
        """Back to NoError, as Qt after a successful create() or attach()."""
        self.error = SharedMemoryError.NoError
        self.error_string = ""

    # -- keys: each returns the backend to use from now on (self, or a new one) ------------------

    @abc.abstractmethod
    def set_key(self, key: str) -> Backend:
        """QSharedMemory::setKey with a str already checked."""

    @abc.abstractmethod
    def set_native_key(self, key: object) -> Backend:
        """QSharedMemory::setNativeKey with a plain name (anything but a QNativeIpcKey)."""

    @abc.abstractmethod
    def set_ipc_key(self, key: QNativeIpcKey) -> Backend:
        """QSharedMemory::setNativeKey(QNativeIpcKey): a Qt key type."""

    @abc.abstractmethod
    def key(self) -> str:
        """The key, '' when none."""

    @abc.abstractmethod
    def native_key(self) -> str:
        """The OS name, '' when none."""

    @abc.abstractmethod
    def ipc_key(self) -> QNativeIpcKey:
        """The native key with its type."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The key part of the facade's repr."""

    # -- the segment ----------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, size: int, mode: AccessMode) -> bool:
        """Create and attach; False with the error set."""

    @abc.abstractmethod
    def attach(self, mode: AccessMode) -> bool:
        """Attach; False with the error set (or left as it was, when already attached)."""

    @abc.abstractmethod
    def detach(self) -> bool:
        """Detach; False when not attached."""

    @abc.abstractmethod
    def is_attached(self) -> bool:
        """True while attached."""

    @abc.abstractmethod
    def size(self) -> int:
        """The attached segment's size, 0 when not attached."""

    @abc.abstractmethod
    def data(self) -> memoryview | None:
        """The bytes, read-only after a ReadOnly attach; None when not attached."""

    @abc.abstractmethod
    def const_data(self) -> memoryview | None:
        """The bytes, read-only; None when not attached."""

    @abc.abstractmethod
    def lock(self, timeout: float | None) -> bool:
        """Take the segment's lock; False (LockError) when it cannot."""

    @abc.abstractmethod
    def unlock(self) -> bool:
        """Release the lock; False when this object does not hold it."""

    def close(self) -> None:
        """The clean-up of ~QSharedMemory, run when the facade goes; nothing by default."""
