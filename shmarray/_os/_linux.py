"""Linux backend: POSIX shared memory as files in /dev/shm.

glibc's ``shm_open(name)`` is ``open("/dev/shm/" + name)``; we use the paths
directly because two things shmarray needs have no ``shm_*`` equivalent:
an atomic publish of a fully initialised segment (``link(2)`` of a private
temporary object to the public name, which fails if the name exists) and
identity checks (``fstat`` inode against ``stat`` of the name) before a
destroyer removes a name. Every fd is opened close-on-exec.

Locks: open-file-description (OFD) byte-range locks mark liveness, and
``flock`` is the data lock. On Linux the two kinds never interact, both are
bound to the open file description, and the kernel drops both when the last
fd of that description closes -- including when its process is killed.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import struct
from typing import Any, Iterator

__all__ = [
    "SHM_DIR",
    "PAGE_SIZE",
    "map_window",
    "privatize",
    "flock",
    "LOCK_SH",
    "LOCK_EX",
    "LOCK_NB",
    "LOCK_UN",
]

def normal_dir(directory: "str | os.PathLike[str]") -> str:
    """A directory as segment names carry it: absolute, no trailing slash."""
    return os.path.abspath(os.fspath(directory)).rstrip("/") or "/"


# The default segment directory: SHMARRAY_DIR, else /dev/shm (where glibc's
# shm_open puts POSIX shared memory). Names of segments elsewhere carry their
# directory: "<dir>/<bare name>" (see qualify).
SHM_DIR = normal_dir(os.environ.get("SHMARRAY_DIR") or "/dev/shm")
PAGE_SIZE = mmap.PAGESIZE

# The data lock, re-exported so the lock layer's hot path is one C call.
flock = fcntl.flock
LOCK_SH = fcntl.LOCK_SH
LOCK_EX = fcntl.LOCK_EX
LOCK_NB = fcntl.LOCK_NB
LOCK_UN = fcntl.LOCK_UN

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("@hhqqi4x")

# Byte offsets of the OFD liveness locks. Every attachment holds a shared lock
# on LIVENESS_BYTE; whoever can take it exclusively is the only attachment.
# Each attachment also holds a shared lock on PID_BASE + pid so that the
# attached processes can be listed from /proc/locks (which shows -1 as the
# pid of OFD locks).
LIVENESS_BYTE = 0
# Every mapping of a segment holds a shared OFD lock on MAPPED_BYTE through
# the open file description the mapping was made from (Python's mmap keeps a
# duplicate of that fd, so the lock lives exactly as long as the mapping, in
# any process, and the kernel drops it with a dead process). Memory is only
# recycled or truncated when nobody holds it: no live view can ever see
# another segment's bytes, or lose its pages.
MAPPED_BYTE = 1
PID_BASE = 1 << 40
PID_SPAN = 1 << 22  # pids are below 2**22 (the kernel's PID_MAX_LIMIT)
# Bytes from PID_BASE + PID_SPAN up are free for the payload layers' own
# byte-range locks (the batch ring's are in shmarray._ring.layout).


def path_of(name: str) -> str:
    """The path of a name: a bare name lives in SHM_DIR, a qualified one says its directory."""
    return name if name.startswith("/") else f"{SHM_DIR}/{name}"


def qualify(directory: str | None, bare: str) -> str:
    """The name of *bare* in *directory*: bare in the default directory, else "<dir>/<bare>"."""
    if directory is None:
        return bare
    d = normal_dir(directory)
    return bare if d == SHM_DIR else f"{d}/{bare}"


def split_name(name: str) -> tuple[str | None, str]:
    """(directory, bare name) of a name; None for the default directory."""
    if not name.startswith("/"):
        return None, name
    d, bare = name.rsplit("/", 1)
    return d, bare


def dir_problem(directory: str, *, writable: bool) -> str | None:
    """Why segments cannot live in *directory* (None when they can)."""
    if not os.path.exists(directory):
        return "does not exist (shmarray never creates it)"
    if not os.path.isdir(directory):
        return "is not a directory"
    if writable and not os.access(directory, os.W_OK | os.X_OK):
        return "cannot be written by this user"
    return None


def create_exclusive(name: str, permissions: int) -> int:
    """Create a new object (O_EXCL) and return a read-write fd."""
    return os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, permissions)


def open_existing(name: str, writable: bool) -> int:
    """Open an existing object; raises FileNotFoundError, PermissionError."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _O_CLOEXEC
    return os.open(path_of(name), flags)


def open_for_locks(name: str) -> tuple[int, bool]:
    """Open an object for its locks: read-write when allowed, else read-only.

    Returns (fd, writable). An exclusive OFD lock needs a writable fd.
    """
    try:
        return open_existing(name, True), True
    except PermissionError:
        return open_existing(name, False), False


def open_pair(name: str) -> tuple[int, int, bool, int, int, int]:
    """Two descriptions of one object: (lock fd, map fd, writable, size, st_dev, st_ino).

    Locks go on the first; mappings are made from the second, because a
    mapping keeps a duplicate of its fd and so its description alive (a
    forked child's inherited mapping must never keep our locks alive). Both
    are opened by name (cheaper than /proc/self/fd) and checked to be the
    same object.
    """
    lock_fd, writable = open_for_locks(name)
    try:
        while True:
            map_fd = open_existing(name, writable)
            st_lock, st_map = os.fstat(lock_fd), os.fstat(map_fd)
            if (st_lock.st_dev, st_lock.st_ino) == (st_map.st_dev, st_map.st_ino):
                return lock_fd, map_fd, writable, st_lock.st_size, st_lock.st_dev, st_lock.st_ino
            # The name was replaced between the two opens: start again.
            os.close(map_fd)
            os.close(lock_fd)
            lock_fd, writable = open_for_locks(name)
    except BaseException:
        os.close(lock_fd)
        raise


def reopen(fd: int, writable: bool) -> int:
    """A new open file description of the same object (works after unlink)."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _O_CLOEXEC
    return os.open(f"/proc/self/fd/{fd}", flags)


def reopen_in_place(fd: int, writable: bool) -> None:
    """Make the number *fd* refer to a new open file description of its object (the old one is let go here)."""
    new = reopen(fd, writable)
    try:
        os.dup2(new, fd, inheritable=False)
    finally:
        os.close(new)


def close(fd: int) -> None:
    """Close an fd, ignoring EBADF (already closed)."""
    try:
        os.close(fd)
    except OSError as e:  # pragma: no cover - defensive
        if e.errno != errno.EBADF:
            raise


def chmod(fd: int, permissions: int) -> None:
    """Set the object's permission bits exactly (the umask applied at creation)."""
    os.fchmod(fd, permissions)


def truncate(fd: int, length: int) -> None:
    """Set the object's length (no pages are allocated); on hugetlbfs, rounded up to whole huge pages."""
    try:
        os.ftruncate(fd, length)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # hugetlbfs takes only lengths of whole huge pages (st_blksize there).
        page = os.fstat(fd).st_blksize
        os.ftruncate(fd, -(-length // page) * page)


def reserve(fd: int, length: int) -> None:
    """Allocate *length* bytes of pages now, so a full /dev/shm is ENOSPC here, not SIGBUS later."""
    os.posix_fallocate(fd, 0, length)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of *data* at *offset* (loops over short writes)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    total = view.nbytes
    while done < total:
        # Linux caps one write at 2 GiB - 4 KiB.
        try:
            n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL:  # hugetlbfs has no write()
                raise
            _write_mapped(fd, view[done:], offset + done)
            return
        if n <= 0:  # pragma: no cover - tmpfs never returns 0
            raise OSError(errno.EIO, "short write to shared memory")
        done += n


def _write_mapped(fd: int, view: memoryview, offset: int) -> None:
    """Write through a mapping of the huge pages the bytes fall in (hugetlbfs, which has no write()).

    Never SIGBUS: mapping a hugetlbfs file reserves its pages, and the
    mapping fails (ENOMEM, reported as ENOSPC) when there are none left;
    the bytes lie inside the file (it is sized before it is written).
    """
    page = os.fstat(fd).st_blksize
    lo = offset - offset % page
    try:
        mm = mmap.mmap(fd, offset + view.nbytes - lo, flags=mmap.MAP_SHARED, offset=lo)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise OSError(errno.ENOSPC, "no free huge pages left for this segment") from None
        raise
    try:
        mm[offset - lo:] = view
    finally:
        mm.close()


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; Python 3.12+ names it


def map_populated_huge(fd: int, length: int) -> mmap.mmap | None:
    """A writable mapping of the first *length* bytes of *fd*, its pages allocated now as huge pages.

    For a tmpfs mounted ``huge=advise``, which gives huge pages only to
    mappings that ask (``MADV_HUGEPAGE``); ``MADV_POPULATE_WRITE`` then
    allocates every page up front, so a full file system is ENOSPC here,
    never SIGBUS at a later write. None on a kernel without it (the caller
    reserves through the fd instead).
    """
    mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError as e:
        mm.close()
        if e.errno == errno.EINVAL:
            return None
        if e.errno in (errno.EFAULT, errno.ENOMEM):  # what a fault would have raised as SIGBUS
            raise OSError(errno.ENOSPC, "no room left to populate this segment") from None
        raise
    return mm


def pread(fd: int, length: int, offset: int) -> bytes:
    """Read up to *length* bytes at *offset*."""
    return os.pread(fd, length, offset)


def peek(name: str, length: int, offset: int = 0) -> bytes:
    """Up to *length* bytes of the object *name* at *offset*: open, pread, close (OSError when it cannot)."""
    fd = open_existing(name, False)
    try:
        return pread(fd, length, offset)
    finally:
        close(fd)


def size_of(fd: int) -> int:
    """The object's length in bytes."""
    return os.fstat(fd).st_size


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of an open object."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def name_identity(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the object a name refers to now, None if it does not exist."""
    facts = name_facts(name)
    return None if facts is None else facts[:2]


def name_facts(name: str) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, st_size) of the object a name refers to now, None if it does not exist."""
    try:
        st = os.stat(path_of(name))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size


def fd_facts(fd: int) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_nlink) of an open object."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_nlink


def link_fd(fd: int, name: str) -> bool:
    """Give the object open as *fd* the name *name* too (one made with O_TMPFILE: once); False if it exists."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc: os.link calls link(2), which would
    # link the /proc symlink itself (EXDEV). Needs no capability (AT_EMPTY_PATH would).
    ctypes = _libc_alloc()[0]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(path_of(name)),
                   _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        raise OSError(err, os.strerror(err), name)
    return True


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def open_by_name(name: str) -> int:
    """Open *name* read-write without following a replacement race (plain open; ENOENT raises)."""
    return os.open(path_of(name), os.O_RDWR | _O_CLOEXEC)


def link(temp_name: str, name: str) -> bool:
    """Give the object *temp_name* the public *name* too; False if *name* exists.

    link(2) is atomic: of several processes racing for one name, one wins.
    """
    try:
        os.link(path_of(temp_name), path_of(name))
    except FileExistsError:
        return False
    return True


def unlink(name: str) -> bool:
    """Remove a name; False if it did not exist."""
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        return False
    return True


def unlink_if_same(name: str, fd: int) -> bool:
    """Remove *name* only if it still refers to the object open as *fd*."""
    if name_identity(name) != identity(fd):
        return False
    return unlink(name)


def map_region(fd: int, offset: int, length: int, writable: bool) -> mmap.mmap:
    """Map *length* bytes at *offset* (a multiple of PAGE_SIZE) of *fd*."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=offset)


# mremap(2) flags (linux/mman.h).
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
# mmap(2) flags Python's mmap module does not export (asm-generic/mman-common.h, the same on every Linux arch).
_MAP_FIXED = 0x10


@functools.lru_cache(maxsize=1)
def _libc_maps() -> tuple[Any, Any, Any, Any, Any]:
    """(ctypes, libc's mmap, mremap, munmap, MAP_FAILED) on first use: Python's mmap cannot map at an address."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    c_map, c_remap, c_unmap = libc.mmap, libc.mremap, libc.munmap
    c_map.restype = c_remap.restype = ctypes.c_void_p
    c_map.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c_remap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    c_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    c_unmap.restype = ctypes.c_int
    return ctypes, c_map, c_remap, c_unmap, ctypes.c_void_p(-1).value


def _address(ctypes: Any, mapping: mmap.mmap) -> int:
    # The export taken here ends with the c_char object, before we return.
    return int(ctypes.addressof(ctypes.c_char.from_buffer(mapping)))


def map_window(fd: int, offset: int, length: int, writable: bool) -> mmap.mmap:
    """Map *length* bytes at *offset* (multiples of PAGE_SIZE) of *fd*, keeping no descriptor.

    Python's mmap of a file keeps a duplicate of the fd for as long as the
    mapping lives; a consumer that keeps one window per batch it hands out
    would run out of descriptors. So an anonymous mmap owns the address
    range (it unmaps it when the last buffer of it goes) and the file is
    mapped over it with MAP_FIXED; its pages are faulted in at once
    (MAP_POPULATE), as a window is mapped to be read.
    """
    if length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
        raise ValueError(f"map_window: offset {offset} and length {length} must be positive page multiples")
    ctypes, c_map, _, _, _ = _libc_maps()
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    mm = mmap.mmap(-1, length, prot=prot)
    addr = _address(ctypes, mm)
    flags = mmap.MAP_SHARED | _MAP_FIXED | getattr(mmap, "MAP_POPULATE", 0)
    got = c_map(addr, length, prot, flags, fd, offset)
    if got != addr:
        err = ctypes.get_errno()
        mm.close()  # MAP_FIXED failed: the range is still the anonymous one (or unmapped): ours to drop
        raise OSError(err, f"mapping a window of the segment failed: {os.strerror(err)}")
    return mm


def privatize(mapping: mmap.mmap) -> None:
    """Turn *mapping* (from map_window) into private memory holding the same bytes, at the same address.

    The bytes are copied into a new anonymous mapping, which mremap(2) then
    moves over the window's range in one step: a thread reading the range
    meanwhile sees the same bytes before and after, never a hole. The
    mapping object still owns the range and unmaps it when it goes; the
    file's pages are no longer reachable through it. MemoryError when the
    copy cannot be made (nothing changed then).
    """
    ctypes, c_map, c_remap, c_unmap, failed = _libc_maps()
    length = len(mapping)
    addr = _address(ctypes, mapping)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    new = c_map(None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if new in (None, failed):
        err = ctypes.get_errno()
        raise MemoryError(f"no memory for a private copy of {length} bytes: {os.strerror(err)}")
    ctypes.memmove(new, addr, length)
    if c_remap(new, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr) != addr:
        err = ctypes.get_errno()
        c_unmap(new, length)
        raise MemoryError(f"moving a private copy of {length} bytes into place failed: {os.strerror(err)}")


# File positions that tag a description for map_marked: far beyond any
# segment (and within every file system's maximum offset), one per call.
_TAG_BASE = 1 << 40
_tag_counter = 0


def map_marked(fd: int, offset: int, length: int, writable: bool) -> tuple[mmap.mmap, int, bool]:
    """Mark *fd*'s description as mapping the object, map it, and keep one fd for both.

    Python's mmap keeps a duplicate of the fd it maps; holding *fd* as well
    would cost a second descriptor per mapping. The duplicate is found
    instead (``dup`` takes the lowest free number, so a probe predicts it,
    and a file position set on the description just before confirms it)
    and *fd* is closed. Returns (mapping, fd of the description, whether
    that fd is the mapping's own: closed with it, never by the caller).
    Where the prediction fails (another thread took the number) *fd* is
    kept: correct, one descriptor more.
    """
    global _tag_counter
    hold_mapped(fd)
    _tag_counter += 1
    tag = _TAG_BASE + _tag_counter
    try:
        os.lseek(fd, tag, os.SEEK_SET)
        probe = os.dup(fd)
        os.close(probe)
    except OSError:  # a file system with a small maximum offset: keep fd
        return map_region(fd, offset, length, writable), fd, False
    mm = map_region(fd, offset, length, writable)
    try:
        if os.lseek(probe, 0, os.SEEK_CUR) == tag and os.fstat(probe).st_ino == os.fstat(fd).st_ino:
            os.close(fd)
            return mm, probe, True
    except OSError:
        pass
    return mm, fd, False


def close_mapping(mapping: mmap.mmap) -> bool:
    """Unmap now; False (and nothing done) while buffers of it are still exported."""
    try:
        mapping.close()
    except BufferError:
        return False
    return True


def release_pages(fd: int) -> None:
    """Free the object's pages now (truncate to 0): for objects no mapping uses and no name keeps."""
    os.ftruncate(fd, 0)


def unmap_without_recency(mapping: mmap.mmap) -> None:
    """Tell the kernel this mapping's accesses are no recency hint before it goes.

    Pages written with pwrite are marked referenced, so when the last view
    goes the unmap would move every page to the active LRU list (tens of ms
    for 512 MiB, benchmarks/results/notes.md; /proc/vmstat pgactivate). With MADV_SEQUENTIAL the unmap
    skips that (Linux 6.3+; harmless before). Done at detach, not at map time,
    so reclaim still sees the accesses of a mapping in use (views that outlive
    an explicit close() carry the advice for the rest of their life).
    """
    try:
        mapping.madvise(mmap.MADV_SEQUENTIAL)
    except (ValueError, OSError):  # already closed, or a kernel without it: only a hint
        pass


def free_bytes(directory: str | None = None) -> int:
    """Bytes the segment directory can still hold."""
    return statvfs_bytes(directory)[0]


def total_bytes(directory: str | None = None) -> int:
    """Size of the segment directory's file system."""
    return statvfs_bytes(directory)[1]


def statvfs_bytes(directory: str | None = None) -> tuple[int, int]:
    """(free, total) bytes of the segment directory's file system.

    A tmpfs or hugetlbfs mounted without ``size=`` reports no blocks: its
    limit is the memory it draws on (free huge pages of its size, or the
    machine's available memory).
    """
    d = directory or SHM_DIR
    st = os.statvfs(d)
    if st.f_blocks:
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    m = mount_of(d)
    if m is not None and m[1] == "hugetlbfs":
        base = f"/sys/kernel/mm/hugepages/hugepages-{st.f_bsize >> 10}kB/"
        try:
            free, resv, total = (int(_read_text(base + n)) for n in ("free_hugepages", "resv_hugepages",
                                                                        "nr_hugepages"))
            return max(0, free - resv) * st.f_bsize, total * st.f_bsize
        except (OSError, ValueError):  # pragma: no cover - no sysfs
            return 0, 0
    meminfo = _meminfo()
    return meminfo.get("MemAvailable", 0), meminfo.get("MemTotal", 0)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    try:
        for line in _read_text("/proc/meminfo").splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:  # pragma: no cover - no /proc
        pass
    return out


def fd_total_bytes(fd: int) -> int:
    """Size of the file system holding the open file *fd*."""
    st = os.fstatvfs(fd)
    return st.f_blocks * st.f_frsize


def list_names(directory: str | None = None) -> list[str]:
    """Names of every object in the segment directory (bare names)."""
    try:
        return os.listdir(directory or SHM_DIR)
    except FileNotFoundError:  # pragma: no cover - no /dev/shm
        return []


# -- OFD byte-range locks ------------------------------------------------------

_F_OFD_SETLK = fcntl.F_OFD_SETLK
_F_OFD_SETLKW = fcntl.F_OFD_SETLKW


def _flock_struct(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)


# Every attach and detach uses these: pack them once.
_SHARED_LIVENESS = _flock_struct(fcntl.F_RDLCK, LIVENESS_BYTE)
_UNLOCK_LIVENESS = _flock_struct(fcntl.F_UNLCK, LIVENESS_BYTE)
_PROBE_LIVENESS = _flock_struct(fcntl.F_WRLCK, LIVENESS_BYTE)
_SHARED_MAPPED = _flock_struct(fcntl.F_RDLCK, MAPPED_BYTE)
_UNLOCK_MAPPED = _flock_struct(fcntl.F_UNLCK, MAPPED_BYTE)
_PROBE_MAPPED = _flock_struct(fcntl.F_WRLCK, MAPPED_BYTE)


def ofd_lock(fd: int, start: int, *, exclusive: bool, wait: bool) -> bool:
    """Lock byte *start*; False if it is held elsewhere and *wait* is False."""
    arg = _flock_struct(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, start)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLKW if wait else _F_OFD_SETLK, arg)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_unlock(fd: int, start: int) -> None:
    """Release this description's lock on byte *start*."""
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock_struct(fcntl.F_UNLCK, start))


def ofd_held_elsewhere(fd: int, start: int) -> bool:
    """True when another open file description holds a lock on byte *start*.

    F_OFD_GETLK takes nothing and ignores this description's own locks, so a
    ring can ask "is the holder of slot i still alive?" without racing it.
    """
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_struct(fcntl.F_WRLCK, start))
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


@functools.lru_cache(maxsize=64)
def _pid_marker(pid: int) -> tuple[bytes, bytes]:
    """(take, release) structs for a pid's marker byte: packed once per process (and fork)."""
    return (_flock_struct(fcntl.F_RDLCK, PID_BASE + pid), _flock_struct(fcntl.F_UNLCK, PID_BASE + pid))


def hold_liveness(fd: int, pid: int) -> None:
    """Take the shared liveness lock and the pid marker of one attachment."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _SHARED_LIVENESS)
    fcntl.fcntl(fd, _F_OFD_SETLKW, _pid_marker(pid)[0])


def drop_liveness(fd: int, pid: int) -> None:
    """Release what hold_liveness took (needed: mmap's dup'd fds keep the description alive)."""
    fcntl.fcntl(fd, _F_OFD_SETLK, _pid_marker(pid)[1])
    fcntl.fcntl(fd, _F_OFD_SETLK, _UNLOCK_LIVENESS)


def hold_mapped(fd: int) -> None:
    """Mark the description *fd* (the one a mapping is made from) as mapping the object."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _SHARED_MAPPED)


def drop_mapped(fd: int) -> None:
    """Undo hold_mapped: the mapping made from *fd* is idle (no view of it exists)."""
    fcntl.fcntl(fd, _F_OFD_SETLK, _UNLOCK_MAPPED)


def mapped_elsewhere(fd: int) -> bool:
    """True when a description other than *fd*'s holds MAPPED_BYTE: some process maps the object."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _PROBE_MAPPED)
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


def others_attached(fd: int) -> bool:
    """True when another description holds the liveness byte (F_OFD_GETLK ignores our own locks).

    Unlike a failing exclusive attempt it raises nothing, so it is the cheap
    first question of every detach.
    """
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _PROBE_LIVENESS)
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


def try_sole(fd: int) -> bool:
    """Try to take the liveness byte exclusively: True if no other attachment exists."""
    return ofd_lock(fd, LIVENESS_BYTE, exclusive=True, wait=False)


def share_liveness(fd: int) -> None:
    """Downgrade an exclusive liveness lock to shared (atomic for fcntl locks)."""
    ofd_lock(fd, LIVENESS_BYTE, exclusive=False, wait=True)


# -- futex: sleeping in the kernel until a word of a shared mapping changes -----

# syscall(2) numbers of futex by machine; elsewhere waiters poll instead.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "ppc64": 221,
              "s390x": 238, "armv7l": 240, "i686": 240}.get(os.uname().machine)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


@functools.lru_cache(maxsize=1)
def _futex_call() -> tuple[Any, Any] | None:
    """(ctypes, libc's syscall) on first use: ctypes is slow to import (benchmarks/results/notes.md), and only rings wait."""
    if _SYS_FUTEX is None:
        return None
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError, ImportError):  # pragma: no cover - a libc without syscall()
        return None
    call.restype = ctypes.c_long
    return ctypes, call


class Doorbell:
    """futex(2) on the 32-bit word at *offset* of *buffer*, a writable view of a shared file mapping.

    ``wait(expected, timeout)`` sleeps in the kernel while the word still
    holds *expected* (its low 32 bits), for at most *timeout* seconds, and
    returns early on ``ring()`` from any process mapping the same file (or
    a signal). No named object: nothing outlives its segment or a crash.
    The caller keeps *buffer* mapped while it uses the doorbell (the word's
    address is taken once); a wait on a mapping that went away returns at once.
    """

    __slots__ = ("_ct", "_call", "_addr", "_ts")

    def __init__(self, ct: Any, call: Any, addr: int) -> None:
        self._ct = ct
        self._call = call
        self._addr = ct.c_void_p(addr)
        self._ts = (ct.c_long * 2)()

    def wait(self, expected: int, timeout: float) -> None:
        """Sleep while the word holds *expected*, at most *timeout* seconds (or until ring())."""
        ts = self._ts
        ts[0] = int(timeout)
        ts[1] = int((timeout - int(timeout)) * 1e9)
        # EAGAIN (it changed already), ETIMEDOUT and EINTR all mean: look again.
        self._call(_SYS_FUTEX, self._addr, _FUTEX_WAIT, self._ct.c_uint(expected & 0xFFFFFFFF),
                   self._ct.byref(ts), None, 0)

    def ring(self) -> None:
        """Wake every process sleeping in wait() on this word."""
        self._call(_SYS_FUTEX, self._addr, _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


def doorbell(buffer: memoryview, offset: int) -> Doorbell | None:
    """A Doorbell on the word at byte *offset* of *buffer*; None where futexes cannot be used (then poll)."""
    found = _futex_call()
    if found is None or buffer.readonly or offset % 4:
        return None
    ct, call = found
    try:
        anchor = ct.c_char.from_buffer(buffer, offset)
    except (TypeError, ValueError, BufferError):
        return None
    addr = ct.addressof(anchor)
    del anchor  # gives up its export of the mapping at once
    return Doorbell(ct, call, addr)


# -- /proc/locks: who is attached, who holds the data lock ---------------------


def _proc_lock_lines() -> Iterator[list[str]]:
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if parts and parts[1] == "->":  # a waiter, listed under the holder
                    parts = [parts[0]] + parts[2:]
                yield parts
    except OSError:  # pragma: no cover - no /proc
        return


def lock_report(dev: int, ino: int) -> tuple[set[int], int, str | None, int | None]:
    """(attached pids, attachments, data-lock mode or None, data-lock holder pid) of one object."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    pids: set[int] = set()
    attachments = 0
    mode: str | None = None
    holder: int | None = None
    for parts in _proc_lock_lines():
        if len(parts) < 8 or parts[5] != want:
            continue
        kind, rw, pid, start = parts[1], parts[3], parts[4], parts[6]
        if kind == "OFDLCK" and start.isdigit():
            s = int(start)
            if s == LIVENESS_BYTE:
                attachments += 1
            elif PID_BASE <= s < PID_BASE + PID_SPAN:
                pids.add(s - PID_BASE)
        elif kind == "FLOCK":
            mode = "exclusive" if rw == "WRITE" else "shared"
            holder = int(pid) if pid.lstrip("-").isdigit() else None
    return pids, attachments, mode, holder


def register_after_fork_in_child(func: "object") -> None:
    """Run *func* in every child made by os.fork()."""
    os.register_at_fork(after_in_child=func)  # type: ignore[arg-type]


def register_fork_hooks(before: "object", after_in_parent: "object") -> None:
    """Run *before* in the parent just before os.fork(), *after_in_parent* just after."""
    os.register_at_fork(before=before, after_in_parent=after_in_parent)  # type: ignore[arg-type]


def hold_guard(fd: int) -> None:
    """Shared liveness and mapped locks on *fd*: a description that stands for a process about to exist."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _SHARED_LIVENESS)
    fcntl.fcntl(fd, _F_OFD_SETLKW, _SHARED_MAPPED)


# Copies at least this large are split between two threads (numpy's copy
# releases the GIL): faster for 512 MiB into touched pages (benchmarks/results/notes.md).
_SPLIT_COPY = 64 << 20


def copy_into(mapping: mmap.mmap, offset: int, data: memoryview) -> None:
    """Copy *data* into *mapping* at *offset* (a memcpy: the pages are already touched)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    n = view.nbytes
    if n < _SPLIT_COPY or (os.cpu_count() or 1) < 2:
        mapping[offset : offset + n] = view
        return
    import threading

    import numpy as np

    dst = np.frombuffer(mapping, np.uint8, count=n, offset=offset)
    src = np.frombuffer(view, np.uint8)
    half = (n // 2) & ~4095
    helper = threading.Thread(target=np.copyto, args=(dst[half:], src[half:]), daemon=True)
    helper.start()
    try:
        np.copyto(dst[:half], src[:half])
    finally:
        helper.join()
        del dst, src


_hosts: dict[str, int] = {}


def mount_of(path: str) -> tuple[str, str, str] | None:
    """(mount point, file system type, super options) of the mount holding *path* (/proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:  # pragma: no cover - no /proc
        return None
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # Later lines are mounted over earlier ones: the last, longest match wins.
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, rest[0], rest[2])
    return best


_huge: dict[str, str | None] = {}


def huge_pages(directory: str | None = None) -> str | None:
    """How huge pages back segments in a directory: a tmpfs's ``huge=`` option (always, within_size,
    advise), "hugetlbfs", else None."""
    d = directory or SHM_DIR
    if d not in _huge:
        m = mount_of(d)
        value = None
        if m is not None and m[1] == "hugetlbfs":
            value = "hugetlbfs"
        elif m is not None and m[1] == "tmpfs":
            for item in m[2].split(","):
                k, _, v = item.partition("=")
                if k == "huge" and v in ("always", "within_size", "advise"):
                    value = v
        _huge[d] = value
    return _huge[d]


HUGE_PAGE = 2 << 20


def huge_mapped_bytes(dev: int, ino: int) -> int:
    """Bytes of this process's mappings of the file (*dev*, *ino*) that huge pages map (/proc/self/smaps).

    Counts 2 MiB page-table entries of tmpfs (``ShmemPmdMapped``) and of
    other files (``FilePmdMapped``), and hugetlbfs pages (``*_Hugetlb``).
    """
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and "-" in fields[0] and fields[4].isdigit():
                    inside = int(fields[4]) == ino and fields[3] == want
                elif inside and len(fields) >= 2 and fields[0] in (
                        "ShmemPmdMapped:", "FilePmdMapped:", "Shared_Hugetlb:", "Private_Hugetlb:"):
                    total += int(fields[1]) << 10
    except OSError:  # pragma: no cover - no /proc
        return 0
    return total


def host_device(directory: str | None = None) -> int:
    """st_dev of the file system of a segment directory (default: SHM_DIR)."""
    return os.stat(directory or SHM_DIR).st_dev


def host_identity(directory: str | None = None) -> int:
    """A 64-bit number that names this machine's boot and the file system of a segment directory.

    Two processes share segments exactly when they see the same /dev/shm:
    the same kernel boot (``/proc/sys/kernel/random/boot_id``) and the same
    mounted file system (its device). A container with its own /dev/shm, or
    another machine, gets another number. Network addresses say nothing
    here (every worker of a local cluster is 127.0.0.1).
    """
    d = directory or SHM_DIR
    got = _hosts.get(d)
    if got is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                boot = int(f.read().strip().replace(b"-", b""), 16)
        except (OSError, ValueError):  # pragma: no cover - no /proc: the hostname stands in
            boot = int.from_bytes(os.uname().nodename.encode()[:16].ljust(16, b"\0"), "little")
        dev = os.stat(d).st_dev
        # A mix, not a digest: the inputs are random already (the boot id is a UUID).
        mixed = (boot ^ (boot >> 64) ^ ((dev + 1) * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
        got = _hosts[d] = mixed or 1
    return got


def limits_hint(code: int) -> str:
    """What limit an EMFILE/ENFILE/ENOMEM from opening or mapping hit, and how to raise it ('' if none)."""
    if code == errno.EMFILE:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard_text, hard_arg, target = "unlimited", "resource.RLIM_INFINITY", max(soft * 4, 65536)
        else:
            hard_text = hard_arg = str(hard)
            target = hard
        return (f"this process reached its descriptor limit RLIMIT_NOFILE = {soft} (hard limit "
                f"{hard_text}); each attached segment needs 2. Raise it: "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({target}, {hard_arg})) "
                f"in Python, or `ulimit -n {target}` in the shell that starts it")
    if code == errno.ENFILE:
        return ("the system-wide limit on open files (fs.file-max) is reached; raise it with "
                "`sysctl -w fs.file-max=N` (root) or close files")
    if code == errno.ENOMEM:
        try:
            with open("/proc/sys/vm/max_map_count") as f:
                limit = int(f.read())
            with open("/proc/self/maps", "rb") as f:
                used = sum(1 for _ in f)
        except (OSError, ValueError):  # pragma: no cover
            return ""
        if used >= limit - 16:
            return (f"this process has {used} mappings and vm.max_map_count is {limit}; raise it "
                    f"with `sysctl -w vm.max_map_count={limit * 4}` (root) or detach segments")
    return ""


def token_hex(nbytes: int) -> str:
    """A random hex string for private names (os.urandom: the secrets module is slow to import, benchmarks/results/notes.md)."""
    return os.urandom(nbytes).hex()


def getpid() -> int:
    """This process's id."""
    return os.getpid()


def getppid() -> int:
    """The parent's pid (1 or a subreaper's once the parent has died)."""
    return os.getppid()


# -- NumPy's data allocator (NEP 49): files without a name, mapped at raw addresses ---------------
#
# ``shmarray.allocating`` (``_reuse.allocator``) gives NumPy a data-allocation
# handler built here with ctypes (no compiler on a user's machine): the
# ``PyDataMem_Handler`` struct of numpy/_core/include/numpy/ndarraytypes.h,
# wrapped in a "mem_handler" capsule and installed with ``PyDataMem_SetHandler``,
# entry 304 of NumPy's C-API table (305: ``PyDataMem_GetHandler``), the same
# in NumPy 1.22 to 2.x.

_API_SET_HANDLER = 304
_HANDLER_VERSION = 1
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
# Callbacks, structs and capsule names live as long as the process: every
# array allocated through a handler keeps its capsule and frees through it.
_keep_alive: list[Any] = []


@functools.lru_cache(maxsize=1)
def _libc_alloc() -> tuple[Any, Any, Any, Any, Any, Any]:
    """(ctypes, libc's malloc, calloc, realloc, free, malloc_usable_size)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    c_malloc, c_calloc, c_realloc, c_free = libc.malloc, libc.calloc, libc.realloc, libc.free
    usable = libc.malloc_usable_size
    for f in (c_malloc, c_calloc, c_realloc):
        f.restype = ctypes.c_void_p
    c_malloc.argtypes = [ctypes.c_size_t]
    c_calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    c_realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    c_free.argtypes = [ctypes.c_void_p]
    c_free.restype = None
    usable.argtypes = [ctypes.c_void_p]
    usable.restype = ctypes.c_size_t
    return ctypes, c_malloc, c_calloc, c_realloc, c_free, usable


def libc_allocator() -> tuple[Any, Any, Any, Any, Any]:
    """libc's (malloc, calloc, realloc, free, malloc_usable_size) as ctypes functions (addresses as ints)."""
    return _libc_alloc()[1:]


# One shim: shim(a, b, c) { void *r = NULL; s = PyGILState_Ensure(); PyErr_Fetch(&t, &v, &tb);
# if (PyErr_CheckSignals() < 0) { if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) *flag = 2;
# PyErr_Clear(); } target(a, b, c, &r); PyErr_Restore(t, v, tb); if (*flag) { n = *flag; *flag = 0;
# PyErr_SetInterruptEx(n); } PyGILState_Release(s); return r; }, x86-64 System V, assembled by GNU
# as from that sequence (endbr64; push rbx, r12, r13; sub rsp, 48: the stack 16-byte aligned at
# each call; t, v, tb, s and r at rsp+0, 8, 16, 24, 32). Signal handlers due run before the
# callback, not inside it, where their exception could not travel: a Ctrl-C is simulated again
# after it (SIGINT's handler runs once more, in the caller's code). The result comes back through
# r, not as the callback's return value: a ctypes callback that raises returns whatever its
# register held, and NumPy would take that for an address. The addresses are placeholders.
_SHIM_X86_64 = bytes.fromhex(
    "f30f1efa53415441554883ec304889fb4989f44989d548c74424200000000048b84444444444444444ffd0894424"
    "18488d3c24488d742408488d54241048b81111111111111111ffd048b88888888888888888ffd085c0793648bf99"
    "9999999999999948b8aaaaaaaaaaaaaaaaffd085c0741048b86666666666666666c7000200000048b8bbbbbbbbbb"
    "bbbbbbffd04889df4c89e64c89ea488d4c242048b82222222222222222ffd0488b5c2420488b3c24488b74240848"
    "8b54241048b83333333333333333ffd048b866666666666666668b3885ff7412c7000000000048b8777777777777"
    "7777ffd08b7c241848b85555555555555555ffd04889d84883c430415d415c5bc3")
_SHIM_SLOTS = {"ensure": 33, "fetch": 63, "check": 75, "keyboard_interrupt": 91, "matches": 101, "clear": 133,
               "target": 159, "restore": 190, "flag": 117, "flag2": 202, "interrupt": 224, "release": 240}
_SHIM_STRIDE = 320
_PROT_EXEC = 4


@functools.lru_cache(maxsize=1)
def _interrupt_word() -> Any:
    import ctypes

    return ctypes.c_int(0)


def interrupt_flag() -> memoryview:
    """A one-int view the allocator's callbacks set to a signal number: the shim simulates that signal after them.

    A Python signal handler that raised inside a callback (Ctrl-C's
    KeyboardInterrupt) raised where nothing can carry the exception out;
    the shim, once the callback is over, calls ``PyErr_SetInterruptEx`` so
    the handler runs again in the caller's code, where its exception goes
    where the user expects it.
    """
    return memoryview(_interrupt_word()).cast("B").cast("i")


def _error_safe(ctypes: Any, targets: list[int]) -> list[int]:
    """Native entry points that call each of *targets* with Python's pending exception set aside.

    NumPy frees an array while an exception propagates (a temporary of a
    failed expression): a ctypes callback entered then runs Python code
    with that exception pending, loses it, and the interpreter goes on
    from a NULL without an exception (SystemError, or a crash). Python's
    own finalizers and weakref callbacks set it aside around their code
    (PyErr_Fetch/PyErr_Restore); ctypes callbacks do not, and no Python
    code can, so each callback gets this native shim in front of it. It
    lives in a page of its own, written, then made read+execute, and kept
    for the life of the process (arrays made with the handler may outlive
    everything else). OSError where no shim can be made: another machine
    than x86-64, or a system that refuses executable memory.
    """
    import platform

    import sys

    gil = getattr(sys, "_is_gil_enabled", None)
    if gil is not None and not gil():
        # The callbacks' state (the pool, the deferred frees, the interrupt flag) relies on the GIL.
        raise OSError(errno.ENOTSUP, "shmarray.allocating() needs the GIL (this interpreter runs without it)")
    if platform.machine().lower() not in ("x86_64", "amd64") or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise OSError(errno.ENOTSUP, f"no native shim for this machine ({platform.machine()}); "
                                     "shmarray.allocating() needs x86-64 in this version")
    api = ctypes.pythonapi
    fixed = {name: ctypes.cast(getattr(api, fn), ctypes.c_void_p).value for name, fn in (
        ("ensure", "PyGILState_Ensure"), ("fetch", "PyErr_Fetch"), ("restore", "PyErr_Restore"),
        ("interrupt", "PyErr_SetInterruptEx"), ("release", "PyGILState_Release"), ("check", "PyErr_CheckSignals"),
        ("matches", "PyErr_ExceptionMatches"), ("clear", "PyErr_Clear"))}
    fixed["flag"] = fixed["flag2"] = ctypes.addressof(_interrupt_word())
    fixed["keyboard_interrupt"] = ctypes.c_void_p.in_dll(api, "PyExc_KeyboardInterrupt").value
    code = bytearray(_SHIM_STRIDE * len(targets))
    for i, target in enumerate(targets):
        one = bytearray(_SHIM_X86_64)
        for slot, at in _SHIM_SLOTS.items():
            one[at:at + 8] = struct.pack("<Q", target if slot == "target" else fixed[slot])
        code[i * _SHIM_STRIDE:i * _SHIM_STRIDE + len(one)] = one
    _, c_map, _, c_unmap, failed = _libc_maps()
    length = -(-len(code) // PAGE_SIZE) * PAGE_SIZE
    page = c_map(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if page in (None, failed):
        raise OSError(ctypes.get_errno(), "mmap for the allocator's shims failed")
    ctypes.memmove(page, bytes(code), len(code))
    protect = ctypes.CDLL(None, use_errno=True).mprotect
    protect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    protect.restype = ctypes.c_int
    if protect(page, length, mmap.PROT_READ | _PROT_EXEC) != 0:
        err = ctypes.get_errno()
        c_unmap(page, length)
        raise OSError(err, "this system refuses executable memory (mprotect PROT_EXEC), which "
                           "shmarray.allocating() needs for its allocator")
    return [page + i * _SHIM_STRIDE for i in range(len(targets))]


def make_numpy_handler(name: bytes, ctx: int, malloc: Any, calloc: Any, realloc: Any, free: Any) -> Any:
    """A NumPy data-allocation handler (a "mem_handler" capsule) calling these Python functions.

    Each gets *ctx* first, then (size, -), (nelem, elsize), (ptr, new_size)
    or (ptr, size), then *out*: the first three store their address (or 0)
    in ``out[0]``, which starts at 0 (NULL), and return nothing. Each is
    entered through a native shim (:func:`_error_safe`) that takes the GIL
    and sets aside an exception NumPy is propagating, so NumPy may call
    them from any thread and at any moment. OSError where that shim cannot
    be made here.
    """
    import ctypes

    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    out = ctypes.POINTER(vp)
    f_malloc = ctypes.CFUNCTYPE(None, vp, sz, sz, out)(malloc)
    f_calloc = ctypes.CFUNCTYPE(None, vp, sz, sz, out)(calloc)
    f_realloc = ctypes.CFUNCTYPE(None, vp, vp, sz, out)(realloc)
    f_free = ctypes.CFUNCTYPE(None, vp, vp, sz, out)(free)
    shims = _error_safe(ctypes, [int(ctypes.cast(f, vp).value or 0) for f in (f_malloc, f_calloc, f_realloc, f_free)])

    class Allocator(ctypes.Structure):
        _fields_ = [("ctx", vp), ("malloc", vp), ("calloc", vp), ("realloc", vp), ("free", vp)]

    class Handler(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", Allocator)]

    handler = Handler(name[:126], _HANDLER_VERSION, Allocator(ctx, *shims))
    capsule_name = ctypes.create_string_buffer(b"mem_handler")
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [vp, vp, vp]
    capsule = new(ctypes.addressof(handler), ctypes.addressof(capsule_name), None)
    _keep_alive.extend((f_malloc, f_calloc, f_realloc, f_free, handler, capsule_name, capsule))
    return capsule


@functools.lru_cache(maxsize=1)
def _set_handler_call() -> Any:
    import ctypes

    import importlib

    try:
        mu: Any = importlib.import_module("numpy._core._multiarray_umath")  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        mu = importlib.import_module("numpy.core._multiarray_umath")
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    table = get(mu._ARRAY_API, None)
    address = int(ctypes.c_void_p.from_address(table + _API_SET_HANDLER * ctypes.sizeof(ctypes.c_void_p)).value or 0)
    # PYFUNCTYPE: called with the GIL held, and a NULL return raises the error NumPy set.
    return ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(address)


def set_numpy_handler(capsule: Any) -> Any:
    """Install *capsule* as NumPy's data allocator in the current context; returns the previous one."""
    return _set_handler_call()(capsule)


def open_nameless(directory: str | None) -> int:
    """A new file without a name in the segment directory (O_TMPFILE): it goes with its last fd and mapping.

    It can be given a name later (``link_fd``), once. OSError where the
    file system has no O_TMPFILE (EOPNOTSUPP, EISDIR on old kernels).
    """
    return os.open(directory or SHM_DIR, os.O_RDWR | _O_TMPFILE | _O_CLOEXEC, 0o600)


def map_at_address(fd: int, length: int, huge_advise: bool) -> int:
    """Map the first *length* bytes of *fd* (shared, read-write) and allocate its pages now; the address.

    Pages are allocated before the mapping is used, so a full file system is
    ENOSPC here and never a SIGBUS later: ``posix_fallocate``, or on a tmpfs
    mounted ``huge=advise`` ``MADV_HUGEPAGE`` and ``MADV_POPULATE_WRITE``
    (fallocate would give it 4 KiB pages).
    """
    ctypes, c_map, _, c_unmap, failed = _libc_maps()
    populate = False
    if huge_advise:
        os.ftruncate(fd, length)
    else:
        os.posix_fallocate(fd, 0, length)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    addr = c_map(None, length, prot, mmap.MAP_SHARED, fd, 0)
    if addr in (None, failed):
        err = ctypes.get_errno()
        raise OSError(err, f"mapping {length} bytes failed: {os.strerror(err)}")
    if huge_advise:
        madvise = _libc_alloc()[0].CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        madvise(addr, length, mmap.MADV_HUGEPAGE)
        populate = madvise(addr, length, _MADV_POPULATE_WRITE) == 0
        if not populate:
            err = ctypes.get_errno()
            try:
                if err != errno.EINVAL:  # EFAULT/ENOMEM: what a fault would have raised as SIGBUS
                    raise OSError(errno.ENOSPC, "no room left to populate this array's pages")
                os.posix_fallocate(fd, 0, length)
            except BaseException:
                c_unmap(addr, length)
                raise
    return int(addr)


def unmap_address(addr: int, length: int) -> None:
    """Unmap what map_at_address (or privatize_address) mapped."""
    _libc_maps()[3](addr, length)


def zero_bytes(addr: int, length: int) -> None:
    """memset(addr, 0, length)."""
    _libc_alloc()[0].memset(addr, 0, length)


def move_bytes(dst: int, src: int, length: int) -> None:
    """memmove(dst, src, length)."""
    _libc_alloc()[0].memmove(dst, src, length)


def privatize_address(addr: int, length: int) -> None:
    """Replace the mapping at [addr, addr + length) by private anonymous memory holding the same bytes.

    Used in a forked child, so that it never writes its parent's arrays:
    one copy, moved into place by mremap(2). MemoryError when no memory is left.
    """
    ctypes, c_map, c_remap, c_unmap, failed = _libc_maps()
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    new = c_map(None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if new in (None, failed):
        raise MemoryError(f"no memory for a private copy of {length} bytes")
    ctypes.memmove(new, addr, length)
    if c_remap(new, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr) != addr:
        c_unmap(new, length)
        raise MemoryError(f"moving a private copy of {length} bytes into place failed")
