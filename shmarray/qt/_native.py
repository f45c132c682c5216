"""QSharedMemory with a Qt key type: Qt 6's own state machine, so a real Qt process shares bytes and lock.

A port of qtbase's ``qsharedmemory.cpp`` (create, attach, detach, lock,
initKey) and its POSIX and System V backends, on Linux, with Qt's error
codes and texts, as the Qt-mode :class:`~._backend.Backend`; the lock's
semaphore (``qsystemsemaphore*.cpp``) is ``_semaphore``'s. The system calls
are ``_os._qtipc``'s. What Qt does, this does, including the
parts that are not shmarray's rules:

* POSIX (PosixRealtime): ``/dev/shm/<key>`` holds only the bytes (no
  header). Qt never removes it on Linux: after every user detached it stays,
  and a later ``create()`` is AlreadyExists. The lock is the named semaphore
  ``sem.<key>`` (or the legacy semaphore name), made with value 1 by
  ``create()``, removed by the object that made it when that object goes.
  A holder that dies leaves it taken.
* System V: ``ftok(<key file>, type)`` names the segment; the key file is
  made by ``create()``. The last detacher that Qt sees (``shm_nattch`` 0)
  removes the segment and the key file. A crashed process leaves both. The
  lock is a System V semaphore with ``SEM_UNDO``: a dead holder's lock is
  given back by the kernel.
* ``create()`` resets the lock's semaphore to 1 even when the segment
  exists (Qt opens it with QSystemSemaphore::Create).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from .._errors import AccessMode
from .._errors import SharedMemoryError as E
from .._wait import check_timeout
from ._backend import Backend, qstring
from ._keys import SYSTEM_SEMAPHORE, QNativeIpcKey, legacy_key_of, legacy_native_key
from ._semaphore import Semaphore, is_posix, qtipc, unix_error

__all__ = ["QtBackend", "is_supported", "remove"]

_log = logging.getLogger("shmarray.qt")


def is_supported(kind: int) -> bool:
    """QSharedMemory::isKeyTypeSupported on this machine: SystemV via libc, PosixRealtime via posix_ipc."""
    if kind == QNativeIpcKey.Type.PosixRealtime:
        return bool(qtipc().posix_available())
    if 1 <= kind <= 0xFF:
        return bool(qtipc().sysv_available())
    return False


# Qt's QSharedMemoryPrivate::setUnixErrorString: (errnos, code, reason) rows; any other errno is
# UnknownError with strerror's text.
_SHM_REASONS = [
    ((errno.EACCES,), E.PermissionDenied, "permission denied"),
    ((errno.EEXIST,), E.AlreadyExists, "already exists"),
    ((errno.ENOENT,), E.NotFound, "doesn't exist"),
    ((errno.EMFILE, errno.ENOMEM, errno.ENOSPC), E.OutOfResources, "out of resources"),
]


class QtBackend(Backend):
    """One QSharedMemory of a Qt key type: QSharedMemoryPrivate and its POSIX / System V backends.

    Once in Qt mode an object stays in it: a str key is Qt's legacy key
    (``setKey``), a plain name a PosixRealtime key (``setNativeKey``).
    """

    def __init__(self, key: QNativeIpcKey) -> None:
        self.qt_key = QNativeIpcKey(key)
        self.memory: Any = None  # the mmap while attached
        self.nbytes = 0
        self.mode = AccessMode.ReadWrite
        self.locked_by_me = False
        self.sem = Semaphore()
        # POSIX backend
        self.fd = -1
        # System V backend
        self.key_file = ""
        self.unix_key = 0
        self.deferred = 0  # our mapping outlived detach() (views of it live): shm_nattch still counts it
        self.pid = os.getpid()

    # -- errors --------------------------------------------------------------------------------------

    def _unix(self, exc: BaseException, function: str) -> bool:
        number = exc.errno if isinstance(exc, OSError) else errno.EINVAL
        return self.set_error(*unix_error(number, function, _SHM_REASONS))

    # -- the backends (qsharedmemory_posix.cpp / qsharedmemory_systemv.cpp) -------------------------

    @property
    def posix(self) -> bool:
        return is_posix(self.qt_key)

    def handle(self) -> bool:
        if self.posix:
            if self.qt_key.isEmpty():
                return self.set_error(E.KeyError, "QSharedMemory::handle: key is empty")
            return True
        if self.unix_key:
            return True
        if not self.key_file:
            self.key_file = self.qt_key.nativeKey()
        if not self.key_file:
            return self.set_error(E.KeyError, "QSharedMemory::handle:: key is empty")
        try:
            self.unix_key = qtipc().ftok(self.key_file, int(self.qt_key.type()))
        except OSError as e:
            self.key_file = ""
            self.unix_key = 0
            return self._unix(e, "QSharedMemory::handle")
        return True

    def clean_handle(self) -> bool:
        ipc = qtipc()
        if self.posix:
            if self.fd != -1:
                ipc.close(self.fd)
            self.fd = -1
            return True
        if not self.unix_key:
            return True
        key_file, self.key_file = self.key_file, ""
        unix_key, self.unix_key = self.unix_key, 0
        try:
            ident = ipc.sysv_get(unix_key, True)
            _, nattch = ipc.sysv_stat(ident)
        except OSError as e:
            return e.errno != errno.EINVAL and e.errno != errno.ENOENT
        if nattch - self.deferred > 0:
            return True
        try:
            ipc.sysv_remove(ident)
        except OSError as e:
            if e.errno != errno.EINVAL:
                return self._unix(e, "QSharedMemory::remove")
        return bool(ipc.remove_file(key_file))

    def _backend_create(self, size: int) -> bool:
        ipc = qtipc()
        if self.posix:
            if not self.handle():
                return False
            try:
                fd = ipc.posix_create(self.qt_key.nativeKey())
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return self.set_error(E.KeyError, "QSharedMemory::attach (shm_open): bad name")
                return self._unix(e, "QSharedMemory::attach (shm_open)")
            try:
                ipc.truncate(fd, size)
            except OSError as e:
                return self._unix(e, "QSharedMemory::create (ftruncate)")
            finally:
                ipc.close(fd)
            return True
        if not self.key_file:
            self.key_file = self.qt_key.nativeKey()
        built = ipc.create_key_file(self.key_file) if self.key_file else -1
        if built == -1:
            return self.set_error(E.KeyError, "QSharedMemory::handle:: unable to make key")
        created_file = built == 1
        if not self.handle():
            if created_file:
                ipc.remove_file(self.key_file)
            return False
        try:
            ipc.sysv_create(self.unix_key, size)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self.set_error(E.InvalidSize, "QSharedMemory::handle: system-imposed size restrictions")
            else:
                self._unix(e, "QSharedMemory::create")
            if created_file and self.error != E.AlreadyExists:
                ipc.remove_file(self.key_file)
            return False
        return True

    def _backend_attach(self, mode: AccessMode) -> bool:
        ipc = qtipc()
        readonly = mode == AccessMode.ReadOnly
        if self.posix:
            try:
                self.fd = ipc.posix_open(self.qt_key.nativeKey(), not readonly)
            except OSError as e:
                self.fd = -1
                if e.errno == errno.EINVAL:
                    return self.set_error(E.KeyError, "QSharedMemory::attach (shm_open): bad name")
                return self._unix(e, "QSharedMemory::attach (shm_open)")
            try:
                size = ipc.posix_size(self.fd)
            except OSError as e:
                self.clean_handle()
                return self._unix(e, "QSharedMemory::attach (fstat)")
            try:
                self.memory = ipc.map_fd(self.fd, size, not readonly)
            except (OSError, ValueError) as e:  # ValueError: Python's mmap refuses 0 bytes (Qt's EINVAL)
                self.clean_handle()
                self.memory = None
                return self._unix(e, "QSharedMemory::attach (mmap)")
            self.nbytes, self.mode = size, mode
            return True
        try:
            ident = ipc.sysv_get(self.unix_key, readonly)
        except OSError as e:
            self.unix_key = 0
            self.key_file = ""
            return self._unix(e, "QSharedMemory::attach (shmget)")
        try:
            size, _ = ipc.sysv_stat(ident)
        except OSError as e:
            return self._unix(e, "QSharedMemory::attach (shmctl)")
        try:
            self.memory = ipc.sysv_map(ident, size, readonly)
        except OSError as e:
            return self._unix(e, "QSharedMemory::attach (shmat)")
        self.nbytes, self.mode = size, mode
        self.deferred = 0
        return True

    def _backend_detach(self) -> bool:
        mapping, self.memory = self.memory, None
        self.nbytes = 0
        unmapped = qtipc().unmap(mapping)
        if self.posix:
            self.clean_handle()
            return True
        self.deferred = 0 if unmapped else 1
        return self.clean_handle()

    # -- QSharedMemory (qsharedmemory.cpp) -----------------------------------------------------------

    def init_key(self, create: bool) -> bool:
        if not self.clean_handle():
            return False
        legacy = legacy_key_of(self.qt_key)
        sem_key = (legacy_native_key(legacy, self.qt_key.type(), prefix=SYSTEM_SEMAPHORE)
                   if legacy else self.qt_key)
        self.sem.set_key(sem_key, create)
        if self.sem.error != E.NoError:
            return self.set_error(self.sem.error, "QSharedMemoryPrivate::initKey: unable to set key on lock "
                                                  f"({self.sem.error_string})")
        self.clear_error()
        return True

    def _locker(self, function: str) -> bool | None:
        """QSharedMemoryLocker + tryLocker: True when locked now, None when there is no key, False on failure."""
        if self.qt_key.isEmpty():
            return None
        if self._lock(None):
            return True
        self.set_error(E.LockError, f"{function}: unable to lock")
        return False

    def create(self, size: int, mode: AccessMode) -> bool:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"QSharedMemory.create: size must be an int, not {type(size).__name__}")
        if not self.init_key(True):
            return False
        locked = self._locker("QSharedMemory::create")
        if locked is False:
            return False
        try:
            if size <= 0:
                return self.set_error(E.InvalidSize, "QSharedMemory::create: create size is less then 0")
            if not self._backend_create(size):
                return False
            return self._backend_attach(mode)
        finally:
            self.unlock()

    def attach(self, mode: AccessMode) -> bool:
        if self.memory is not None or not self.init_key(False):
            return False
        locked = self._locker("QSharedMemory::attach")
        if locked is False:
            return False
        try:
            if self.memory is not None or not self.handle():
                return False
            return self._backend_attach(mode)
        finally:
            self.unlock()

    def detach(self) -> bool:
        if self.memory is None:
            return False
        locked = self._locker("QSharedMemory::detach")
        if locked is False:
            return False
        try:
            return self._backend_detach()
        finally:
            self.unlock()

    def lock(self, timeout: float | None) -> bool:
        return self._lock(check_timeout(timeout))

    def _lock(self, timeout: float | None) -> bool:
        if self.locked_by_me:
            _log.warning("QSharedMemory::lock: already locked")
            return True
        if self.sem.acquire(timeout):
            self.locked_by_me = True
            return True
        return self.set_error(E.LockError, "QSharedMemory::lock: unable to lock")

    def unlock(self) -> bool:
        if not self.locked_by_me:
            return False
        self.locked_by_me = False
        if self.sem.release():
            return True
        return self.set_error(E.LockError, "QSharedMemory::unlock: unable to unlock")

    def is_attached(self) -> bool:
        return self.memory is not None

    def size(self) -> int:
        return self.nbytes

    def data(self) -> memoryview | None:
        return self._view(self.mode == AccessMode.ReadOnly)

    def const_data(self) -> memoryview | None:
        return self._view(True)

    def _view(self, readonly: bool) -> memoryview | None:
        if self.memory is None:
            return None
        view = memoryview(self.memory)[: self.nbytes]
        return view.toreadonly() if readonly else view

    # -- keys (QSharedMemory::setKey / setNativeKey) ----------------------------------------------------

    def set_key(self, key: str) -> Backend:
        return self.set_ipc_key(legacy_native_key(key))  # '' gives Qt's empty key of the legacy type

    def set_native_key(self, key: object) -> Backend:
        return self.set_ipc_key(QNativeIpcKey(qstring(key, "setNativeKey")))  # PosixRealtime, as in Qt 6

    def set_ipc_key(self, key: QNativeIpcKey) -> Backend:
        if key == self.qt_key and key.isEmpty():
            return self
        if not is_supported(key.type()):
            self.set_error(E.KeyError, "QSharedMemory::setNativeKey: unsupported key type")
            return self
        if self.memory is not None:
            self.detach()
        self.clean_handle()
        self.qt_key = QNativeIpcKey(key)
        self.key_file = ""
        self.unix_key = 0
        return self

    def key(self) -> str:
        return legacy_key_of(self.qt_key)

    def native_key(self) -> str:
        return self.qt_key.nativeKey()

    def ipc_key(self) -> QNativeIpcKey:
        return QNativeIpcKey(self.qt_key)

    def describe(self) -> str:
        return f"nativeIpcKey={self.qt_key!r}"

    def close(self) -> None:
        """~QSharedMemory: detach, clean the handle, and the semaphore's own clean-up.

        Only in the process that made the object: a forked child exiting does
        not run its parent's destructors in C++ either (it would remove the
        parent's semaphore).
        """
        if os.getpid() != self.pid:
            return
        try:
            if self.memory is not None:
                self.detach()
            self.clean_handle()
        finally:
            self.sem.clean()


def remove(key: QNativeIpcKey) -> bool:
    """Remove what Qt keeps for *key*: the segment, the lock's semaphore and the key files.

    For the segments Qt leaves behind (every POSIX one, and System V ones
    whose last user crashed). Whoever still uses them keeps a mapping but
    loses the lock. True when something was removed.
    """
    ipc = qtipc()
    native = key.nativeKey()
    if not native:
        return False
    legacy = legacy_key_of(key)
    sem_native = (legacy_native_key(legacy, key.type(), prefix=SYSTEM_SEMAPHORE).nativeKey()
                  if legacy else native)
    removed = False
    if is_posix(key):
        try:
            removed = bool(ipc.posix_unlink(native))
        except OSError:  # a name shm_open refuses: nothing can be there
            pass
        return bool(ipc.posix_sem_unlink(sem_native)) or removed
    for path, is_segment in ((native, True), (sem_native, False)):
        try:
            unix_key = ipc.ftok(path, int(key.type()))
        except OSError:
            continue  # no key file: nothing Qt can name is left
        if is_segment:
            try:
                ipc.sysv_remove(ipc.sysv_get(unix_key, True))
                removed = True
            except OSError:
                pass
        removed = ipc.sysv_sem_remove(unix_key) or removed
        removed = ipc.remove_file(path) or removed
    return removed
