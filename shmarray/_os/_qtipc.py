"""The system calls Qt's QSharedMemory makes on Linux, for the facade's Qt key types.

Nothing here knows Qt's rules (what is created when, what is removed when):
``shmarray.qt._native`` holds those. This module only makes the calls, the
way Qt's ``qsharedmemory_posix.cpp``, ``qsharedmemory_systemv.cpp`` and the
two ``qsystemsemaphore_*.cpp`` make them:

* POSIX shared memory: glibc's ``shm_open`` is ``open("/dev/shm/<name>")``
  with the name's leading slashes dropped; done here with ``os.open``.
* POSIX named semaphores (``/dev/shm/sem.<name>``): posix_ipc, imported on
  first use.
* System V: ``ftok``, ``shmget``/``shmat``/``shmctl`` and
  ``semget``/``semop``/``semtimedop``/``semctl`` through libc (ctypes), with
  ``SEM_UNDO`` on every semop as Qt sets it. Not sysv_ipc: its wheel here
  is built without ``semtimedop`` (``SEMAPHORE_TIMEOUT_SUPPORTED`` is False,
  so a timed lock blocks for ever), and a view of its mapping outlives
  ``detach()`` and then crashes the interpreter. Here a segment is attached
  over an anonymous ``mmap`` that Python owns (``SHM_REMAP``): a detach with
  live views is refused by mmap itself, and the last view's going unmaps it.

This module is imported only when a Qt key type is used (ctypes is slow to import).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import time
from typing import Any

# close(2) ignoring EBADF, and fstat's st_size: the ones the segments use.
from ._linux import close, size_of as posix_size

__all__ = [
    "MissingModuleError",
    "posix_available",
    "sysv_available",
    "SHM_DIR",
    "shm_path",
    "posix_create",
    "truncate",
    "close",
    "posix_open",
    "posix_size",
    "posix_unlink",
    "map_fd",
    "PosixSemaphore",
    "SysVSemaphore",
    "posix_sem_unlink",
    "sysv_sem_remove",
    "ftok",
    "create_key_file",
    "remove_file",
    "sysv_get",
    "sysv_create",
    "sysv_map",
    "sysv_stat",
    "sysv_remove",
    "unmap",
]

SHM_DIR = "/dev/shm"
_IPC_CREAT, _IPC_EXCL, _IPC_RMID, _IPC_STAT = 0o1000, 0o2000, 0, 2
_SHM_RDONLY, _SHM_REMAP = 0o10000, 0o40000
_GETVAL, _SETVAL, _SEM_UNDO = 12, 16, 0x1000
PAGE = mmap.PAGESIZE


class MissingModuleError(ImportError):
    """A Qt key type needs a module of the ``qt`` extra that is not installed."""


def _module(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as e:
        raise MissingModuleError(
            f"Qt's POSIX key type (PosixRealtime) needs the {name} package for Qt's named semaphore: "
            f"pip install {name}"
        ) from e


def posix_available() -> bool:
    """True when posix_ipc (POSIX named semaphores) can be imported."""
    try:
        _module("posix_ipc")
    except MissingModuleError:
        return False
    return True


def sysv_available() -> bool:
    """True when libc has System V IPC (shmat, semtimedop, ftok)."""
    return _libc() is not None


# -- POSIX shared memory ---------------------------------------------------------------------------

def shm_path(name: str) -> str:
    """The file glibc's shm_open(name) opens; OSError(EINVAL) for a name it refuses."""
    bare = name.lstrip("/")
    if not bare or "/" in bare or bare in (".", "..") or "\0" in bare:
        raise OSError(errno.EINVAL, "invalid POSIX shared memory name", name)
    return os.path.join(SHM_DIR, bare)


def posix_create(name: str) -> int:
    """shm_open(O_RDWR|O_CREAT|O_EXCL, 0600): the new object's fd."""
    return os.open(shm_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def truncate(fd: int, size: int) -> None:
    """ftruncate(2)."""
    os.ftruncate(fd, size)


def posix_open(name: str, writable: bool) -> int:
    """shm_open of an existing object (O_RDWR or O_RDONLY): the fd Qt keeps while attached."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(shm_path(name), flags, 0o600 if writable else 0o400)


def posix_unlink(name: str) -> bool:
    """shm_unlink; False when it did not exist."""
    try:
        os.unlink(shm_path(name))
    except FileNotFoundError:
        return False
    return True


def map_fd(fd: int, size: int, writable: bool) -> mmap.mmap:
    """mmap(MAP_SHARED) of *size* bytes (PROT_READ only when not writable)."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED,
                     mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


# -- semaphores --------------------------------------------------------------------------------------

class PosixSemaphore:
    """A POSIX named semaphore, opened as Qt's QSystemSemaphorePosix::handle() does."""

    __slots__ = ("name", "_sem", "created")

    def __init__(self, name: str, initial: int, reset: bool) -> None:
        """Open *name*, creating it with *initial* when missing.

        *reset* (Qt's AccessMode Create): an existing semaphore is unlinked and
        a new one made (up to three tries, as Qt). ``created`` says whether
        this call made it; whoever made it unlinks it in ``close(unlink=True)``.
        """
        posix_ipc = _module("posix_ipc")
        self.name = name
        excl = True
        tries = 1
        attempt = 0
        sem = None
        while attempt < tries:
            attempt += 1
            try:
                flags = posix_ipc.O_CREX if excl else posix_ipc.O_CREAT
                sem = posix_ipc.Semaphore(name, flags, 0o600, initial)
                break
            except posix_ipc.ExistentialError:
                if reset:
                    try:
                        posix_ipc.unlink_semaphore(name)
                    except posix_ipc.ExistentialError:
                        pass
                    tries = 3
                else:
                    excl = False
                    tries = 2
        if sem is None:
            raise OSError(errno.EEXIST, "semaphore exists", name)
        self._sem = sem
        self.created = excl

    def acquire(self, timeout: float | None) -> bool:
        """sem_wait (sem_timedwait with a timeout); False when it timed out."""
        posix_ipc = _module("posix_ipc")
        while True:
            try:
                self._sem.acquire(timeout)
            except posix_ipc.BusyError:
                return False
            except posix_ipc.SignalError:
                # EINTR: Python's handler runs at the next bytecode (Ctrl-C raises there); else wait on.
                # A timed wait starts its timeout again, as Qt's EINTR loop does for its untimed one.
                continue
            return True

    def release(self) -> None:
        """sem_post."""
        self._sem.release()

    def close(self, unlink: bool) -> None:
        """sem_close, then sem_unlink when *unlink* (this object made it)."""
        posix_ipc = _module("posix_ipc")
        try:
            self._sem.close()
        finally:
            if unlink:
                try:
                    posix_ipc.unlink_semaphore(self.name)
                except posix_ipc.ExistentialError:
                    pass


class SysVSemaphore:
    """A one-element System V semaphore set, as Qt's QSystemSemaphoreSystemV::handle() opens it."""

    __slots__ = ("key", "ident", "created", "_ops")

    def __init__(self, key: int, initial: int, reset: bool) -> None:
        """semget(IPC_CREAT|IPC_EXCL, 0600), else semget(IPC_CREAT); SETVAL *initial* when made or *reset*."""
        _, libc = _libc()
        self.key = key
        ident = libc.semget(key, 1, 0o600 | _IPC_CREAT | _IPC_EXCL)
        self.created = ident != -1
        if ident == -1:
            if _errno() != errno.EEXIST:
                raise _call_failed()
            ident = libc.semget(key, 1, 0o600 | _IPC_CREAT)
            if ident == -1:
                raise _call_failed()
        self.ident = int(ident)
        # Qt's semop() always sets SEM_UNDO: the kernel gives a dead holder's count back.
        down, up = _SemBuf(0, -1, _SEM_UNDO), _SemBuf(0, 1, _SEM_UNDO)
        self._ops = {-1: (down, ctypes.byref(down)), 1: (up, ctypes.byref(up))}
        if self.created or reset:
            if libc.semctl(self.ident, 0, _SETVAL, ctypes.c_int(initial)) == -1:
                raise _call_failed()

    def _semop(self, delta: int, timeout: float | None) -> bool:
        ct, libc = _libc()
        op = self._ops[delta][1]
        if timeout is None:
            while libc.semop(self.ident, op, 1) == -1:
                if _errno() != errno.EINTR:
                    raise _call_failed()
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            left = max(0.0, deadline - time.monotonic())
            ts = _TimeSpec(int(left), int((left - int(left)) * 1e9))
            if libc.semtimedop(self.ident, op, 1, ct.byref(ts)) == 0:
                return True
            number = _errno()
            if number == errno.EAGAIN:
                return False
            if number != errno.EINTR:
                raise _call_failed()

    def acquire(self, timeout: float | None) -> bool:
        """semop(-1, SEM_UNDO) (semtimedop with a timeout); False when it timed out."""
        return self._semop(-1, timeout)

    def release(self) -> None:
        """semop(+1, SEM_UNDO)."""
        self._semop(1, None)

    def value(self) -> int:
        """semctl(GETVAL)."""
        _, libc = _libc()
        got = libc.semctl(self.ident, 0, _GETVAL)
        if got == -1:
            raise _call_failed()
        return int(got)

    def remove(self) -> None:
        """semctl(IPC_RMID); a set already gone is fine."""
        _, libc = _libc()
        if libc.semctl(self.ident, 0, _IPC_RMID) == -1 and _errno() not in (errno.EINVAL, errno.EIDRM):
            raise _call_failed()


def posix_sem_unlink(name: str) -> bool:
    """sem_unlink; False when it did not exist."""
    posix_ipc = _module("posix_ipc")
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def sysv_sem_remove(key: int) -> bool:
    """semctl(IPC_RMID) on the set *key* names, if there is one; True when one was removed."""
    _, libc = _libc()
    ident = libc.semget(key, 0, 0)
    if ident == -1:
        return False
    return bool(libc.semctl(ident, 0, _IPC_RMID) == 0)


def ftok(path: str, proj: int) -> int:
    """ftok(3); OSError (ENOENT, ...) when *path* cannot be stat'ed."""
    _, libc = _libc()
    key = libc.ftok(os.fsencode(path), proj)
    if key == -1:
        raise _call_failed()
    return int(key)


def create_key_file(path: str) -> int:
    """Qt's createUnixKeyFile: 1 when made (O_EXCL, 0640), 0 when it existed, -1 on another error."""
    try:
        fd = os.open(path, os.O_EXCL | os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o640)
    except FileExistsError:
        return 0
    except OSError:
        return -1
    os.close(fd)
    return 1


def remove_file(path: str) -> bool:
    """unlink(2); False when it failed (missing, or not ours)."""
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


# -- System V shared memory ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        libc.shmget.restype = ctypes.c_int
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmat.restype = ctypes.c_void_p
        libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        libc.shmctl.restype = ctypes.c_int
        libc.ftok.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.ftok.restype = ctypes.c_int
        libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        libc.semget.restype = ctypes.c_int
        libc.semop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        libc.semop.restype = ctypes.c_int
        libc.semtimedop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.semtimedop.restype = ctypes.c_int
        libc.semctl.restype = ctypes.c_int  # variadic: SETVAL's value is passed as a c_int
    except (OSError, AttributeError):  # pragma: no cover - a libc without System V IPC
        return None
    return ctypes, libc


def _errno() -> int:
    return int(ctypes.get_errno())


def _call_failed() -> OSError:
    number = _errno()
    return OSError(number, os.strerror(number))


class _SemBuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def sysv_get(key: int, readonly: bool) -> int:
    """shmget(key, 0, 0400 or 0600): the id of an existing segment."""
    _, libc = _libc()
    ident = libc.shmget(key, 0, 0o400 if readonly else 0o600)
    if ident == -1:
        raise _call_failed()
    return int(ident)


def sysv_create(key: int, size: int) -> int:
    """shmget(key, size, 0600|IPC_CREAT|IPC_EXCL)."""
    _, libc = _libc()
    ident = libc.shmget(key, size, 0o600 | _IPC_CREAT | _IPC_EXCL)
    if ident == -1:
        raise _call_failed()
    return int(ident)


# struct shmid_ds on 64-bit Linux (x86_64, aarch64, ...): shm_segsz at 48, shm_nattch at 88.
_SHMID_DS = 112
_SEGSZ_AT, _NATTCH_AT = 48, 88


def sysv_stat(ident: int) -> tuple[int, int]:
    """shmctl(IPC_STAT): (shm_segsz, shm_nattch)."""
    ct, libc = _libc()
    if ct.sizeof(ct.c_void_p) != 8:  # pragma: no cover - 32-bit layouts differ
        raise OSError(errno.ENOSYS, "System V shared memory is supported on 64-bit Linux only")
    buf = ct.create_string_buffer(_SHMID_DS + 16)
    if libc.shmctl(ident, _IPC_STAT, buf) == -1:
        raise _call_failed()
    size, = struct.unpack_from("N", buf, _SEGSZ_AT)
    nattch, = struct.unpack_from("N", buf, _NATTCH_AT)
    return int(size), int(nattch)


def sysv_remove(ident: int) -> None:
    """shmctl(IPC_RMID): the segment goes when its last attachment does."""
    _, libc = _libc()
    if libc.shmctl(ident, _IPC_RMID, None) == -1:
        raise _call_failed()


def _address(buffer: Any) -> int:
    """The first byte's address of a (possibly read-only) buffer."""
    view = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
    if get(buffer, ctypes.byref(view), 0) != 0:  # pragma: no cover - an mmap always exports
        raise OSError(errno.EFAULT, "no buffer")
    try:
        return int(view.buf)
    finally:
        ctypes.pythonapi.PyBuffer_Release.argtypes = [ctypes.c_void_p]
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def sysv_map(ident: int, size: int, readonly: bool) -> mmap.mmap:
    """shmat(ident) over an anonymous mapping Python owns: closing or dropping the mmap is shmdt.

    The mmap covers *size* rounded up to whole pages (what shmat maps); it is
    read-only (SHM_RDONLY and PROT_READ) when *readonly*.
    """
    _, libc = _libc()
    length = max(PAGE, -(-size // PAGE) * PAGE)
    region = mmap.mmap(-1, length, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
                       mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE))
    try:
        at = _address(region)
        got = libc.shmat(ident, at, _SHM_REMAP | (_SHM_RDONLY if readonly else 0))
        if got is None or got == 2 ** 64 - 1 or got == -1:
            raise _call_failed()
        if got != at:  # pragma: no cover - SHM_REMAP maps at the address given or fails
            raise OSError(errno.EFAULT, "shmat mapped elsewhere")
    except BaseException:
        region.close()
        raise
    return region


def unmap(mapping: mmap.mmap) -> bool:
    """munmap (shmdt for a System V mapping); False when views of it live: it goes with the last one."""
    try:
        mapping.close()
    except BufferError:
        return False
    return True
