"""The lock of a Qt-mode QSharedMemory: a port of Qt 6's QSystemSemaphore (``qsystemsemaphore*.cpp``).

PosixRealtime keys lock with a POSIX named semaphore (``sem.<key>``), made
with value 1 by ``create()`` and removed by the object that made it; a
holder that dies leaves it taken. System V keys lock with a System V
semaphore with ``SEM_UNDO``, named by ``ftok`` of a key file: the kernel
gives a dead holder's lock back. The system calls are ``_os._qtipc``'s,
loaded on first use (:func:`qtipc`), which the shared memory half
(``_native``) uses too, as it uses :func:`unix_error` for Qt's errno texts.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .._errors import SharedMemoryError as E
from ._keys import QNativeIpcKey

__all__ = ["Semaphore", "is_posix", "qtipc", "unix_error"]


def qtipc() -> Any:
    """``_os._qtipc``, imported on first use."""
    from .._os import _qtipc  # ctypes and the System V calls load only when a Qt key type is used

    return _qtipc


def is_posix(key: QNativeIpcKey) -> bool:
    """True for a PosixRealtime key (else System V)."""
    return key.type() == QNativeIpcKey.Type.PosixRealtime

# Qt's QSystemSemaphorePrivate::setUnixErrorString: (errnos, code, reason) rows; any other errno is
# UnknownError with strerror's text.
_SEM_REASONS = [
    ((errno.EPERM, errno.EACCES), E.PermissionDenied, "permission denied"),
    ((errno.EEXIST,), E.AlreadyExists, "already exists"),
    ((errno.ENOENT,), E.NotFound, "does not exist"),
    ((errno.ERANGE, errno.ENOSPC, errno.EMFILE), E.OutOfResources, "out of resources"),
    ((errno.ENAMETOOLONG,), E.KeyError, "key too long"),
]


def unix_error(number: int | None, function: str, reasons: list[tuple[tuple[int, ...], E, str]]) -> tuple[E, str]:
    """Qt's setUnixErrorString: the code and ``"<function>: <reason>"`` for *number* from *reasons* rows."""
    for numbers, code, reason in reasons:
        if number in numbers:
            return code, f"{function}: {reason}"
    return E.UnknownError, f"{function}: unknown error: {os.strerror(number or 0)}"


def _sem_errno(number: int | None, function: str) -> tuple[E, str]:
    return unix_error(number, function, _SEM_REASONS)


class Semaphore:
    """The lock: Qt's QSystemSemaphore with initial value 1, keyed as QSharedMemoryPrivate::initKey keys it."""

    def __init__(self) -> None:
        self.key: QNativeIpcKey | None = None
        self.handle: Any = None
        self.file = ""
        self.created_file = False
        self.removes = False  # this object made (or reset) the semaphore: it removes it at clean()
        # QSystemSemaphore's own error, not QSharedMemory's: initKey reports it inside its own text.
        self.error = E.NoError
        self.error_string = ""

    def set_key(self, key: QNativeIpcKey, create: bool) -> None:
        """QSystemSemaphore::setNativeKey(key, 1, Create or Open)."""
        if self.key is not None and key == self.key and not create:
            return
        self.error, self.error_string = E.NoError, ""
        self.clean()
        self.key = QNativeIpcKey(key)
        self._open(create)

    def _open(self, create: bool) -> bool:
        if self.handle is not None:
            return True
        key = self.key
        native = key.nativeKey() if key is not None else ""
        ipc = qtipc()
        posix = key is not None and is_posix(key)
        if not native:
            where = "QSystemSemaphore::handle" if posix else "QSystemSemaphore::handle:"
            self.error, self.error_string = E.KeyError, f"{where}: key is empty"
            return False
        try:
            if posix:
                sem = ipc.PosixSemaphore(native, 1, create)
                self.removes = sem.created
            else:
                built = ipc.create_key_file(native)
                if built == -1:
                    self.error, self.error_string = E.KeyError, "QSystemSemaphore::handle:: unable to make key"
                    return False
                self.file = native
                self.created_file = built == 1
                try:
                    unix_key = ipc.ftok(native, int(key.type()))  # type: ignore[union-attr]
                except OSError:
                    self.error, self.error_string = E.KeyError, "QSystemSemaphore::handle:: ftok failed"
                    return False
                sem = ipc.SysVSemaphore(unix_key, 1, create)
                if sem.created or create:
                    # A new set may be one a crash left behind: Qt takes ownership of its file too.
                    self.removes = True
                    self.created_file = True
        except OSError as e:
            self.error, self.error_string = _sem_errno(e.errno, "QSystemSemaphore::handle")
            self._drop_file()
            return False
        self.handle = sem
        return True

    def _drop_file(self) -> None:
        if self.created_file and self.file:
            qtipc().remove_file(self.file)
        self.created_file = False

    def clean(self) -> None:
        """QSystemSemaphore::cleanHandle: close; remove what this object made."""
        sem, self.handle = self.handle, None
        try:
            if sem is None:
                return
            if isinstance(sem, qtipc().PosixSemaphore):
                sem.close(unlink=self.removes)
            elif self.removes:
                sem.remove()
        except OSError as e:  # Qt only records it
            self.error, self.error_string = _sem_errno(e.errno, "QSystemSemaphore::cleanHandle")
        finally:
            self._drop_file()
            self.removes = False

    def acquire(self, timeout: float | None) -> bool:
        if not self._open(False):
            return False
        try:
            return bool(self.handle.acquire(timeout))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIDRM):  # removed under us: Qt opens it afresh
                if isinstance(self.handle, qtipc().SysVSemaphore):
                    self.clean()  # Qt's System V retry runs cleanHandle (the key file goes if it was ours)
                else:
                    self.handle = None
                return self.acquire(timeout)
            self.error, self.error_string = _sem_errno(e.errno, "QSystemSemaphore::modifySemaphore")
            return False

    def release(self) -> bool:
        if not self._open(False):
            return False
        try:
            self.handle.release()
        except OSError as e:
            self.error, self.error_string = _sem_errno(e.errno, "QSystemSemaphore::modifySemaphore")
            return False
        return True
