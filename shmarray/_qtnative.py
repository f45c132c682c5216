"""QSharedMemory with a Qt key type: Qt 6's own state machine, so a real Qt process shares bytes and lock.

A port of qtbase's ``qsharedmemory.cpp`` (create, attach, detach, lock,
initKey), its POSIX and System V backends and ``qsystemsemaphore*.cpp``
(the lock's semaphore), on Linux, with Qt's error codes and texts. The
system calls are ``_os._qtipc``'s. What Qt does, this does, including the
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

from ._errors import AccessMode, SharedMemoryError as E
from ._qtkeys import SYSTEM_SEMAPHORE, QNativeIpcKey, legacy_key_of, legacy_native_key

__all__ = ["QtNative", "is_supported", "remove"]

_log = logging.getLogger("shmarray.qt")


def _ipc() -> Any:
    from ._os import _qtipc  # ctypes and the System V calls load only when a Qt key type is used

    return _qtipc


def is_supported(kind: int) -> bool:
    """QSharedMemory::isKeyTypeSupported on this machine: SystemV via libc, PosixRealtime via posix_ipc."""
    if kind == QNativeIpcKey.Type.PosixRealtime:
        return bool(_ipc().posix_available())
    if 1 <= kind <= 0xFF:
        return bool(_ipc().sysv_available())
    return False


def _is_posix(key: QNativeIpcKey) -> bool:
    return key.type() == QNativeIpcKey.Type.PosixRealtime


# Qt's QSharedMemoryPrivate::setUnixErrorString and QSystemSemaphorePrivate::setUnixErrorString:
# (errnos, code, reason) rows; any other errno is UnknownError with strerror's text.
_SHM_REASONS = [
    ((errno.EACCES,), E.PermissionDenied, "permission denied"),
    ((errno.EEXIST,), E.AlreadyExists, "already exists"),
    ((errno.ENOENT,), E.NotFound, "doesn't exist"),
    ((errno.EMFILE, errno.ENOMEM, errno.ENOSPC), E.OutOfResources, "out of resources"),
]
_SEM_REASONS = [
    ((errno.EPERM, errno.EACCES), E.PermissionDenied, "permission denied"),
    ((errno.EEXIST,), E.AlreadyExists, "already exists"),
    ((errno.ENOENT,), E.NotFound, "does not exist"),
    ((errno.ERANGE, errno.ENOSPC, errno.EMFILE), E.OutOfResources, "out of resources"),
    ((errno.ENAMETOOLONG,), E.KeyError, "key too long"),
]


def _unix_error(number: int | None, function: str, reasons: list[tuple[tuple[int, ...], E, str]]) -> tuple[E, str]:
    for numbers, code, reason in reasons:
        if number in numbers:
            return code, f"{function}: {reason}"
    return E.UnknownError, f"{function}: unknown error: {os.strerror(number or 0)}"


def _shm_errno(number: int | None, function: str) -> tuple[E, str]:
    return _unix_error(number, function, _SHM_REASONS)


def _sem_errno(number: int | None, function: str) -> tuple[E, str]:
    return _unix_error(number, function, _SEM_REASONS)


class _Semaphore:
    """The lock: Qt's QSystemSemaphore with initial value 1, keyed as QSharedMemoryPrivate::initKey keys it."""

    def __init__(self) -> None:
        self.key: QNativeIpcKey | None = None
        self.handle: Any = None
        self.file = ""
        self.created_file = False
        self.removes = False  # this object made (or reset) the semaphore: it removes it at clean()
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
        ipc = _ipc()
        posix = key is not None and _is_posix(key)
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
            _ipc().remove_file(self.file)
        self.created_file = False

    def clean(self) -> None:
        """QSystemSemaphore::cleanHandle: close; remove what this object made."""
        sem, self.handle = self.handle, None
        try:
            if sem is None:
                return
            if isinstance(sem, _ipc().PosixSemaphore):
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
                if isinstance(self.handle, _ipc().SysVSemaphore):
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


class QtNative:
    """The state of one QSharedMemory of a Qt key type (QSharedMemoryPrivate and its backend)."""

    def __init__(self, key: QNativeIpcKey) -> None:
        self.key = QNativeIpcKey(key)
        self.error = E.NoError
        self.error_string = ""
        self.memory: Any = None  # the mmap while attached
        self.size = 0
        self.mode = AccessMode.ReadWrite
        self.locked_by_me = False
        self.sem = _Semaphore()
        # POSIX backend
        self.fd = -1
        # System V backend
        self.key_file = ""
        self.unix_key = 0
        self.deferred = 0  # our mapping outlived detach() (views of it live): shm_nattch still counts it
        self.pid = os.getpid()

    # -- errors --------------------------------------------------------------------------------------

    def _set(self, code: E, text: str) -> bool:
        self.error, self.error_string = code, text
        return False

    def _unix(self, exc: BaseException, function: str) -> bool:
        number = exc.errno if isinstance(exc, OSError) else errno.EINVAL
        return self._set(*_shm_errno(number, function))

    # -- the backends (qsharedmemory_posix.cpp / qsharedmemory_systemv.cpp) -------------------------

    @property
    def posix(self) -> bool:
        return _is_posix(self.key)

    def handle(self) -> bool:
        if self.posix:
            if self.key.isEmpty():
                return self._set(E.KeyError, "QSharedMemory::handle: key is empty")
            return True
        if self.unix_key:
            return True
        if not self.key_file:
            self.key_file = self.key.nativeKey()
        if not self.key_file:
            return self._set(E.KeyError, "QSharedMemory::handle:: key is empty")
        try:
            self.unix_key = _ipc().ftok(self.key_file, int(self.key.type()))
        except OSError as e:
            self.key_file = ""
            self.unix_key = 0
            return self._unix(e, "QSharedMemory::handle")
        return True

    def clean_handle(self) -> bool:
        ipc = _ipc()
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
        ipc = _ipc()
        if self.posix:
            if not self.handle():
                return False
            try:
                fd = ipc.posix_create(self.key.nativeKey())
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return self._set(E.KeyError, "QSharedMemory::attach (shm_open): bad name")
                return self._unix(e, "QSharedMemory::attach (shm_open)")
            try:
                ipc.truncate(fd, size)
            except OSError as e:
                return self._unix(e, "QSharedMemory::create (ftruncate)")
            finally:
                ipc.close(fd)
            return True
        if not self.key_file:
            self.key_file = self.key.nativeKey()
        built = ipc.create_key_file(self.key_file) if self.key_file else -1
        if built == -1:
            return self._set(E.KeyError, "QSharedMemory::handle:: unable to make key")
        created_file = built == 1
        if not self.handle():
            if created_file:
                ipc.remove_file(self.key_file)
            return False
        try:
            ipc.sysv_create(self.unix_key, size)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self._set(E.InvalidSize, "QSharedMemory::handle: system-imposed size restrictions")
            else:
                self._unix(e, "QSharedMemory::create")
            if created_file and self.error != E.AlreadyExists:
                ipc.remove_file(self.key_file)
            return False
        return True

    def _backend_attach(self, mode: AccessMode) -> bool:
        ipc = _ipc()
        readonly = mode == AccessMode.ReadOnly
        if self.posix:
            try:
                self.fd = ipc.posix_open(self.key.nativeKey(), not readonly)
            except OSError as e:
                self.fd = -1
                if e.errno == errno.EINVAL:
                    return self._set(E.KeyError, "QSharedMemory::attach (shm_open): bad name")
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
            self.size, self.mode = size, mode
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
        self.size, self.mode = size, mode
        self.deferred = 0
        return True

    def _backend_detach(self) -> bool:
        mapping, self.memory = self.memory, None
        self.size = 0
        unmapped = _ipc().unmap(mapping)
        if self.posix:
            self.clean_handle()
            return True
        self.deferred = 0 if unmapped else 1
        return self.clean_handle()

    # -- QSharedMemory (qsharedmemory.cpp) -----------------------------------------------------------

    def init_key(self, create: bool) -> bool:
        if not self.clean_handle():
            return False
        legacy = legacy_key_of(self.key)
        sem_key = (legacy_native_key(legacy, self.key.type(), prefix=SYSTEM_SEMAPHORE)
                   if legacy else self.key)
        self.sem.set_key(sem_key, create)
        if self.sem.error != E.NoError:
            return self._set(self.sem.error, "QSharedMemoryPrivate::initKey: unable to set key on lock "
                                             f"({self.sem.error_string})")
        self.error, self.error_string = E.NoError, ""
        return True

    def _locker(self, function: str) -> bool | None:
        """QSharedMemoryLocker + tryLocker: True when locked now, None when there is no key, False on failure."""
        if self.key.isEmpty():
            return None
        if self.lock(None):
            return True
        self._set(E.LockError, f"{function}: unable to lock")
        return False

    def create(self, size: int, mode: AccessMode) -> bool:
        if not self.init_key(True):
            return False
        locked = self._locker("QSharedMemory::create")
        if locked is False:
            return False
        try:
            if size <= 0:
                return self._set(E.InvalidSize, "QSharedMemory::create: create size is less then 0")
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
        if self.locked_by_me:
            _log.warning("QSharedMemory::lock: already locked")
            return True
        if self.sem.acquire(timeout):
            self.locked_by_me = True
            return True
        return self._set(E.LockError, "QSharedMemory::lock: unable to lock")

    def unlock(self) -> bool:
        if not self.locked_by_me:
            return False
        self.locked_by_me = False
        if self.sem.release():
            return True
        return self._set(E.LockError, "QSharedMemory::unlock: unable to unlock")

    def data(self, readonly: bool) -> memoryview | None:
        if self.memory is None:
            return None
        view = memoryview(self.memory)[: self.size]
        return view.toreadonly() if readonly else view

    def rekey(self, key: QNativeIpcKey) -> None:
        """QSharedMemory::setNativeKey after its checks: detach, clean the handle, take the key."""
        if self.memory is not None:
            self.detach()
        self.clean_handle()
        self.key = QNativeIpcKey(key)
        self.key_file = ""
        self.unix_key = 0

    def destroy(self) -> None:
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
    ipc = _ipc()
    native = key.nativeKey()
    if not native:
        return False
    legacy = legacy_key_of(key)
    sem_native = (legacy_native_key(legacy, key.type(), prefix=SYSTEM_SEMAPHORE).nativeKey()
                  if legacy else native)
    removed = False
    if _is_posix(key):
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
