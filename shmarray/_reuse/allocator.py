"""NumPy's data in shared memory: the NEP 49 handler behind ``shmarray.allocating``.

Inside ``with shmarray.allocating(min_bytes):`` every array NumPy allocates
with at least *min_bytes* gets its data in a file of the segment directory,
so that ``share(key, a)`` publishes that file instead of copying (``_lifecycle.publish_block``).
Smaller requests go to libc's malloc family, unchanged. The handler is a
NumPy context variable: threads and tasks outside the block keep theirs,
and every array frees through the handler that allocated it, so arrays
that outlive the block come back here when they go.

One allocation is one file, laid out as the segment it may become::

    [0, PAGE)          room for the control block (written at share())
    [PAGE, data_at)    room for the payload header and .npy descriptor
    [data_at, ...)     the array's data: what NumPy gets (page aligned;
                       2 MiB aligned where huge pages back the directory)

- The file has no name (``O_TMPFILE``): whatever kills the process,
  nothing is left in the directory. At the first ``share()`` it gets a
  hidden name of this process's (``_reuse.kept_files``' naming, so a killed
  process's names are reaped as kept files are) and then its public name;
  a file without a name can be linked only once, the hidden name lets it
  be published again when it is recycled.
- Its pages are allocated before NumPy sees the address (``posix_fallocate``),
  so a full directory is a failed allocation (NumPy's MemoryError, an
  ``OutOfResourcesError`` once it leaves the block), never a SIGBUS; fresh
  pages are zero, so ``calloc`` costs no extra pass.
- Freed arrays go back to a pool (bounded by ``idle_maps.budget``); the next
  allocation of a fitting size (50-100% of the file) takes the file with
  its pages already allocated and mapped. A published file is taken back
  only once its segment is gone everywhere (no name, nobody attached, no
  mapping in use elsewhere); until then it is kept, mapped, so its pages
  stay valid for any process that uses them.
- Every live or pooled file is marked mapped (``MAPPED_BYTE``): no other
  process frees its pages under this one's arrays.
- A forked child copies the shared-memory arrays it inherits into private
  memory (at the fork), as fork's copy-on-write would: parent and child
  never write each other's arrays.
"""

from __future__ import annotations

import atexit
import errno
import threading
from typing import Any

from . import idle_maps, kept_files
from .._display import human
from .._errors import InvalidSizeError, OutOfResourcesError, UnknownShmError
from .._os import backend

__all__ = ["allocating", "Block", "holds", "block_for", "publishing"]

_MIN_FILL = 0.5  # a pooled file serves an allocation of at least this fraction of it
_MAX_POOL = 8
_ROOM = 2 * backend.PAGE_SIZE  # control page + a page for header and descriptor

_malloc, _calloc, _realloc, _free, _usable = backend.libc_allocator()


class Block:
    """One file that holds (or held) an array's data."""

    __slots__ = ("fd", "base", "length", "data_at", "size", "dir", "dev", "ino", "published", "hidden", "pid")

    def __init__(self, fd: int, base: int, length: int, data_at: int, size: int, directory: str | None) -> None:
        self.fd = fd
        self.base = base
        self.length = length
        self.data_at = data_at
        self.size = size  # bytes NumPy asked for
        self.dir = directory
        self.dev, self.ino = backend.identity(fd)
        self.published = False  # its current array was shared (a segment holds the file)
        self.hidden: str | None = None  # the hidden name, once first published
        self.pid = backend.getpid()  # 0 once privatized in a forked child

    @property
    def addr(self) -> int:
        """Where the data starts."""
        return self.base + self.data_at

    @property
    def capacity(self) -> int:
        """The most data bytes the file holds."""
        return self.length - self.data_at

    @property
    def room(self) -> int:
        """The payload offset from the user bytes (after the control page): header and descriptor fit before it."""
        return self.data_at - backend.PAGE_SIZE


_LOCK = threading.RLock()  # reentrant: a finalizer may free an array inside an allocation
_live: dict[int, Block] = {}  # data address -> block
_pool: list[Block] = []
_configs: dict[int, tuple[int, str | None]] = {}  # handler ctx -> (min_bytes, directory)
_handlers: dict[tuple[int, str | None], Any] = {}
_failure = threading.local()


def _data_at(size: int, directory: str | None) -> int:
    if size >= backend.HUGE_PAGE and backend.huge_pages(directory) is not None:
        return backend.HUGE_PAGE
    return _ROOM


def _fresh(size: int, directory: str | None) -> Block | None:
    """A new file and mapping for *size* data bytes; None where the directory cannot have one."""
    data_at = _data_at(size, directory)
    page = backend.HUGE_PAGE if data_at == backend.HUGE_PAGE else backend.PAGE_SIZE
    length = -(-(data_at + size) // page) * page
    for attempt in (1, 2):
        try:
            fd = backend.open_nameless(directory)
        except OSError as e:
            _failure.error = (e.errno, size, directory)
            return None
        try:
            base = backend.map_at_address(fd, length, backend.huge_pages(directory) == "advise")
            try:
                backend.hold_mapped(fd)
                return Block(fd, base, length, data_at, size, directory)
            except BaseException:
                backend.unmap_address(base, length)
                raise
        except BaseException as e:
            # Also a KeyboardInterrupt once fallocate (the long part) returned: the file goes with its fd.
            backend.close(fd)
            if not isinstance(e, OSError):
                raise
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM) and attempt == 1:
                if kept_files.give_back(length, directory) > 0:  # this pool's files first
                    continue
            _failure.error = (e.errno, size, directory)
            return None
    return None  # pragma: no cover


def _reusable(b: Block) -> bool:
    """True when nothing but this process's pool holds the file (a published one: its segment is gone)."""
    if not b.published:
        return True
    try:
        nlink = backend.fd_facts(b.fd)[3]
        return (nlink == (1 if b.hidden else 0) and not backend.others_attached(b.fd)
                and not backend.mapped_elsewhere(b.fd))
    except OSError:  # pragma: no cover - the fd is ours
        return False


def _drop(b: Block) -> int:
    """Let the file go: hidden name, pages (when nobody else holds them), mapping, fd; the bytes freed."""
    freed = 0
    try:
        if b.hidden is not None:
            backend.unlink_if_same(b.hidden, b.fd)
            b.hidden = None
        if _reusable(b):
            backend.release_pages(b.fd)
            idle_maps.forget_file(b.dev, b.ino)
            freed = b.length
    except OSError:  # pragma: no cover - the fd is ours
        pass
    backend.unmap_address(b.base, b.length)
    backend.close(b.fd)
    return freed


def _give_back(directory: str | None) -> int:
    """Free the pooled files of *directory* (a create or an allocation is short of room); bytes freed."""
    _drain()
    with _LOCK:
        mine = [b for b in _pool if b.dir == directory]
        for b in mine:
            _pool.remove(b)
    # Only what was released counts: a published file another process still holds keeps its pages.
    return sum(_drop(b) for b in mine)


def _take(size: int, directory: str | None) -> Block | None:
    with _LOCK:
        for b in sorted(_pool, key=lambda b: b.length):
            if b.dir == directory and b.capacity * _MIN_FILL <= size <= b.capacity and _reusable(b):
                _pool.remove(b)
                b.published = False
                b.size = size
                return b
    return None


def _big(ctx: int, size: int, zero: bool) -> int | None:
    directory = _configs[ctx][1]
    b = _take(size, directory)
    if b is not None:
        if zero:
            backend.zero_bytes(b.addr, size)
    else:
        b = _fresh(size, directory)
        if b is None:
            return None
    _live[b.addr] = b
    return b.addr


def _release(b: Block) -> None:
    """An array's data went: keep the file for the next allocation (within the budget), or drop it."""
    if b.pid != backend.getpid():  # private memory in a forked child
        backend.unmap_address(b.base, b.length)
        return
    drop: list[Block] = []
    with _LOCK:
        cap = idle_maps.budget(b.dir)
        if cap <= 0 or b.length > cap or b.length < idle_maps.MIN_KEEP:
            drop.append(b)
        else:
            _pool.append(b)
            total = sum(x.length for x in _pool if x.dir == b.dir)
            while len(_pool) > _MAX_POOL or total > cap:
                old = next(x for x in _pool if x.dir == b.dir) if total > cap else _pool[0]
                _pool.remove(old)
                if old.dir == b.dir:
                    total -= old.length
                drop.append(old)
    for x in drop:
        _drop(x)


# -- the handler's four functions (ctypes callbacks: never raise) -----------------------------


# The callbacks run Python code inside NumPy. The shim in front of them (``backend.make_numpy_handler``)
# runs the signal handlers that are due before a callback, so a Ctrl-C lands there and is simulated
# again after it. A signal arriving during a callback may still raise there, at the end of any call,
# losing a result just returned. So nothing that cannot be done twice is done before the result is
# safe: an allocation is tried again (what the lost attempt took is at worst leaked, never freed
# twice; a new file interrupted after its pages were allocated is closed), an old pointer realloc
# leaves is marked for freeing (``_deferred``, a store with no call between it and the result's)
# and freed right after, or at the next callback if that is interrupted; an interrupted free is not
# redone. The interrupt itself is kept: the flag makes the shim simulate SIGINT after the callback.
# Results go to ``out[0]``, a slot of the shim's own call that starts at NULL: a callback that
# raises leaves NULL, never garbage, and no other call (another thread, a tracer that lets the GIL
# go between a callback's return and its shim) can touch it. Signal handlers other than SIGINT's
# that raise inside a callback are lost there (the shim clears them), as a Python finalizer's are.
_deferred: dict[int, int] = {}  # pointer -> size: freed at the next callback
_interrupted = backend.interrupt_flag()
_SIGINT = 2
_TRIES = 3


def _drain() -> None:
    """Free what realloc left behind."""
    while _deferred:
        try:
            ptr, size = _deferred.popitem()  # out of the dict first: an interrupted free is never redone
        except KeyError:  # another thread took the last one
            return
        _let_go(ptr)


def _let_go(ptr: int) -> None:
    """Free *ptr*: a file of ours goes back for reuse (or is dropped), libc's memory to libc."""
    b = _live.pop(ptr, None)
    if b is None:
        _free(ptr)
    else:
        _release(b)


def _allocate(ctx: int, size: int, zero: bool, nelem: int = 0, elsize: int = 0) -> int | None:
    if size < _configs[ctx][0]:
        return _calloc(nelem, elsize) if zero else _malloc(size)  # type: ignore[no-any-return]
    return _big(ctx, size, zero)


def _on_malloc(ctx: int, size: int, _unused: int, out: Any) -> None:
    for _ in range(_TRIES):
        try:
            if _deferred:
                _drain()
            out[0] = _allocate(ctx, size, False)  # left at 0 (NULL): NumPy raises MemoryError
            return
        except KeyboardInterrupt:
            _interrupted[0] = _SIGINT
        except BaseException:  # noqa: BLE001
            return


def _on_calloc(ctx: int, nelem: int, elsize: int, out: Any) -> None:
    for _ in range(_TRIES):
        try:
            if _deferred:
                _drain()
            out[0] = _allocate(ctx, nelem * elsize, True, nelem, elsize)
            return
        except KeyboardInterrupt:
            _interrupted[0] = _SIGINT
        except BaseException:  # noqa: BLE001
            return


def _on_realloc(ctx: int, ptr: int | None, new_size: int, out: Any) -> None:
    for _ in range(_TRIES):
        try:
            if _deferred:
                _drain()
            if not ptr:
                out[0] = _allocate(ctx, new_size, False)
                return
            b = _live.get(ptr)
            if b is not None and not b.published and b.pid == backend.getpid() and new_size <= b.capacity:
                b.size = new_size  # in place; a shared array's file keeps its segment's bytes
                out[0] = ptr
                return
            old = _usable(ptr) if b is None else b.size
            addr = _allocate(ctx, max(new_size, 1), False)
            if addr is None:
                return  # NULL: NumPy keeps ptr, untouched
            backend.move_bytes(addr, ptr, min(old, new_size))
            # The one destructive step, and the result, with no call between them: from here on
            # nothing is redone, and the old pointer goes now (or, if interrupted, at the next callback).
            _deferred[ptr] = old
            out[0] = addr
            break
        except KeyboardInterrupt:
            _interrupted[0] = _SIGINT
        except BaseException:  # noqa: BLE001
            return
    else:
        return
    try:
        _drain()
    except KeyboardInterrupt:
        _interrupted[0] = _SIGINT
    except BaseException:  # noqa: BLE001
        pass


def _on_free(ctx: int, ptr: int | None, size: int, _out: Any) -> None:
    try:
        if _deferred:
            _drain()
        if ptr:
            _let_go(ptr)
    except KeyboardInterrupt:
        _interrupted[0] = _SIGINT
    except BaseException:  # noqa: BLE001 - nothing to report to NumPy
        pass


def _handler_for(min_bytes: int, directory: str | None) -> Any:
    with _LOCK:
        capsule = _handlers.get((min_bytes, directory))
        if capsule is None:
            ctx = len(_configs) + 1
            _configs[ctx] = (min_bytes, directory)
            capsule = _handlers[(min_bytes, directory)] = backend.make_numpy_handler(
                b"shmarray", ctx, _on_malloc, _on_calloc, _on_realloc, _on_free)
    return capsule


# -- what share() asks ----------------------------------------------------------------------------


def holds(array: Any) -> bool:
    """True when *array*'s data starts an allocation of this handler's (the cheap first question of share())."""
    return bool(_live) and int(array.__array_interface__["data"][0]) in _live


def block_for(array: Any, directory: str | None) -> Block | None:
    """The file holding exactly *array*'s data (contiguous, all of it, not yet shared) in *directory*, else None."""
    if not _live:
        return None
    b = _live.get(int(array.__array_interface__["data"][0]))
    if (b is None or b.published or b.pid != backend.getpid() or b.dir != directory
            or array.nbytes != b.size or array.nbytes == 0
            or not (array.flags.c_contiguous or array.flags.f_contiguous)):
        return None
    return b


class publishing:
    """``with publishing(block) as source:`` the file's hidden name to link the segment from; marks it published."""

    def __init__(self, block: Block) -> None:
        self.block = block

    def __enter__(self) -> str:
        b = self.block
        if b.hidden is None:
            b.hidden = kept_files.hide(b.fd, b.dir)
        return b.hidden

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.block.published = True


# -- the public context manager -------------------------------------------------------------------


class allocating:
    """Allocate NumPy arrays of at least *min_bytes* in shared memory inside the ``with`` block.

    ``share(key, a)`` of such an array publishes the memory it already lives
    in: no copy. Smaller arrays, and threads or tasks outside the block, use
    NumPy's usual allocator. Arrays freed (inside the block or after it)
    return their memory for reuse. Blocks nest; leaving one (by return or
    exception) restores the allocator that was in place before it.

    Parameters
    ----------
    min_bytes : int, optional
        The smallest allocation that goes to shared memory (default 1 MiB).
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm);
        ``share(..., dir=)`` copies nothing only for the same directory.

    Raises
    ------
    OutOfResourcesError
        When the block is left by a full directory: the allocation fails
        inside with NumPy's MemoryError.
    TypeError, InvalidSizeError
        For a *min_bytes* that is not an int >= 1.
    UnknownShmError
        On entering, where the allocator cannot run: a machine other than
        x86-64, or a system that refuses executable memory (a few bytes of
        native code let NumPy free arrays while an exception propagates).

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> with shmarray.allocating(min_bytes=4096):
    ...     a = np.ones(100_000)
    >>> s = shmarray.share("doc-allocating", a)     # no copy
    >>> a[0] = 5
    >>> float(s[0])
    5.0
    """

    def __init__(self, min_bytes: int = 1 << 20, *, dir: Any = None) -> None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int):
            raise TypeError(f"allocating: min_bytes must be an int, not {type(min_bytes).__name__}")
        if min_bytes < 1:
            raise InvalidSizeError(f"allocating: min_bytes must be >= 1, got {min_bytes}")
        self.min_bytes = min_bytes
        if dir is None:
            self.dir: str | None = None
        else:
            d = backend.normal_dir(dir)
            self.dir = None if d == backend.SHM_DIR else d
        self._previous: list[Any] = []

    def __enter__(self) -> allocating:
        try:
            capsule = _handler_for(self.min_bytes, self.dir)
        except OSError as e:  # no native shim here (another machine, no executable memory)
            raise UnknownShmError(f"allocating: not available here: {e.strerror or e}") from None
        _failure.error = None
        self._previous.append(backend.set_numpy_handler(capsule))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        backend.set_numpy_handler(self._previous.pop())
        _drain()
        failed = getattr(_failure, "error", None)
        _failure.error = None
        if isinstance(exc, MemoryError) and not isinstance(exc, OutOfResourcesError) and failed is not None:
            code, size, directory = failed
            where = directory or backend.SHM_DIR
            raise OutOfResourcesError(
                f"allocating: an array of {human(size)} does not fit in {where} "
                f"({human(backend.free_bytes(directory))} free of {human(backend.total_bytes(directory))}; "
                f"{errno.errorcode.get(code, code)}): free arrays or segments, or enlarge {where}") from exc

    def __repr__(self) -> str:
        return f"shmarray.allocating(min_bytes={self.min_bytes}{'' if self.dir is None else f', dir={self.dir!r}'})"


allocating.__module__ = "shmarray"


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.RLock()
    for b in list(_live.values()):
        if b.pid == 0:
            continue
        try:
            backend.privatize_address(b.base, b.length)
        except MemoryError:  # pragma: no cover - no memory for the copy: it stays shared
            pass
        backend.close(b.fd)
        b.pid = 0
        b.hidden = None
    while _pool:
        b = _pool.pop()
        backend.unmap_address(b.base, b.length)
        backend.close(b.fd)


def _at_exit() -> None:
    # Live arrays keep their memory to the end; their hidden names go now, so a
    # segment that outlives this process is freed by its last user's detach.
    for b in list(_live.values()):
        if b.hidden is not None and b.pid == backend.getpid():
            try:
                backend.unlink_if_same(b.hidden, b.fd)
            except OSError:  # pragma: no cover
                pass
            b.hidden = None
    _give_back_all()


def _give_back_all() -> None:
    with _LOCK:
        pool = list(_pool)
        _pool.clear()
    for b in pool:
        _drop(b)


backend.register_after_fork_in_child(_after_fork_in_child)
atexit.register(_at_exit)
kept_files._also_release.append(_give_back_all)
kept_files._also_give_back.append(_give_back)
