"""The segment lifecycle: every sequence that builds, opens, publishes, recycles and retires a segment.

A segment is built completely in a private file (control block, then the
payload through *fill*) and published by ``link(2)`` under its name, so an
attacher never sees half a segment; of racing creators one wins. Opening
takes the file's liveness lock shared before anything else (``_os``), checks
that the name still names that file, and retires what processes that all
died left behind. A reference attaches the segment *instance* it names
(``Reference.incarnation``), never a successor under the same key. Where the
pages come from (a kept file of this process's, or fresh ones) is the
reuse layer's business (``_reuse.kept_files``: files kept by creators; ``_reuse.idle_maps``:
idle mappings); who destroys what at the last detach is ``_attachment``'s.

This module is what ``Segment`` (``_segment``, the Qt-shaped handle) calls:
it raises ShmError subclasses only, in the words a user can act on.
"""

from __future__ import annotations

import errno
import operator
import os
from typing import Callable, NamedTuple, SupportsIndex, Union

from . import _watch
from ._reuse import idle_maps, kept_files
from ._attachment import (
    _Attachment,
    _mark_dead,
    _reap_if_dead,
    _retire,
    held_instance,
    holds_name,
    register,
    release_user,
    share_instance,
    share_named,
)
from ._control import HEAD_BYTES, PAGE_SIZE, ControlBlock, control_bytes, new_incarnation, parse_control
from ._display import human as _human
from ._errors import (
    AccessMode,
    AlreadyExistsError,
    InvalidSizeError,
    NotFoundError,
    OutOfResourcesError,
    PermissionDeniedError,
    ShmError,
    UnknownShmError,
    _InvalidSizeTypeError,
)
from ._os import TEMP_PREFIX, backend, check_native_key, native_key_for
from ._os._names import qt_posix_names

__all__ = ["Where", "Fill", "Dir", "create", "attach", "attach_instance", "unlink", "missing", "no_space",
           "check_size", "check_usable", "check_dir", "LIFETIME_RULE"]

#: A ``dir=`` argument: the segment directory (None: ``SHMARRAY_DIR``, else /dev/shm).
Dir = Union[str, "os.PathLike[str]", None]
#: What a builder writes the user bytes with: ``fill(write)``, ``write(data, user_offset)``.
Fill = Callable[[Callable[[memoryview, int], None]], None]


class Where(NamedTuple):
    """Which segment a sequence is about: its key (None for a native key), directory and name for messages."""

    key: str | None
    dir: str | None  # None: the default directory
    label: str | None  # the key, else the native key


# -- creating ---------------------------------------------------------------------------------


def create(where: Where, name: str, size: int, mode: AccessMode, persistent: bool, permissions: int,
           fill: Fill | None, reserve: bool) -> _Attachment:
    """Build and publish segment *name* (*size* user bytes), attached and registered; raises ShmError.

    Memory this process keeps for reuse gives way first when the directory
    is short of room; a full directory is an OutOfResourcesError before
    anything is written, never a SIGBUS later.
    """
    total = PAGE_SIZE + size
    kept_files.maybe_reap(where.dir)
    free = backend.free_bytes(where.dir)
    if total > free:
        kept_files.give_back(total - free, where.dir)
        if total > backend.free_bytes(where.dir):
            raise no_space("create", where.label, where.key, where.dir, total)
    for attempt in (1, 2):
        try:
            att = _build(where, name, size, mode, persistent, permissions, fill, reserve)
            register(att)
            return att
        except ShmError:
            raise  # already in a user's words (some are OSErrors too)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                if attempt == 1 and kept_files.give_back(total, where.dir) > 0:
                    continue
                raise no_space("create", where.label, where.key, where.dir, total) from e
            raise _translate(e, "create", where.label, where.dir) from e
    raise AssertionError("unreachable")  # pragma: no cover


# -- attaching --------------------------------------------------------------------------------


def attach(where: Where, name: str, mode: AccessMode) -> _Attachment:
    """This process's attachment of segment *name* (the one it holds, else a new one); raises ShmError."""
    try:
        return open_named(where, name, mode)
    except ShmError:
        raise
    except FileNotFoundError:
        raise missing("attach", where.key, where.dir, None if where.key is not None else where.label) from None
    except OSError as e:
        raise _translate(e, "attach", where.label, where.dir) from e


def attach_instance(where: Where, native: str | None, mode: AccessMode, host: int,
                    incarnation: int) -> _Attachment:
    """The attachment of the segment instance a reference names; raises ShmError.

    In a process that holds that instance nothing is opened or mapped.
    Otherwise the name is attached and must still be the same instance: a
    reference made on another host, to a segment that is gone, or to one
    whose key now names another segment is refused, never mapped.
    """
    label = where.label
    if host and host != _host_of(where.dir):
        raise ShmError(
            f"segment {label!r} lives on another host (or another /dev/shm): its reference was "
            "made where this process cannot map it; send the data by value there "
            "(np.asarray(a) pickles the bytes)", where.key)
    if incarnation:
        att = share_instance(incarnation, mode)
        if att is not None:
            return att
        held = held_instance(incarnation)
        if held is not None:  # held in the other mode: a new description of the same file
            try:
                att = _open_again(where, held, mode)
            except ShmError:
                raise
            except OSError as e:
                raise _translate(e, "attach", label) from e
            register(att)
            return att
    bare = native_key_for(where.key) if where.key is not None else check_native_key(native or "")
    try:
        att = attach(where, backend.qualify(where.dir, bare), mode)
    except NotFoundError:
        if not incarnation:
            raise
        raise NotFoundError(
            f"the segment {label!r} that this reference refers to is gone or was replaced: nothing "
            f"has that key now (the last process holding it detached or exited before the reference "
            f"was used). {LIFETIME_RULE}", where.key) from None
    if incarnation and att.incarnation != incarnation:
        release_user(att)
        raise NotFoundError(
            f"the segment {label!r} that this reference refers to is gone or was replaced: the key "
            "now names another segment; the reference cannot be used", where.key)
    return att


def unlink(where: Where, name: str, att: _Attachment | None) -> bool:
    """Remove the name now (only if it is still *att*'s file); False when it was gone. Raises ShmError."""
    try:
        if att is not None:
            return backend.unlink_if_same(name, att.fd)
        return backend.unlink(name)
    except OSError as e:
        raise _translate(e, "unlink", where.label) from e


# -- the words of failure ---------------------------------------------------------------------------

def check_size(size: object, what: str) -> int:
    # isinstance(int) first: the runtime Protocol check is slow (benchmarks/results/notes.md), an int needs none.
    if isinstance(size, bool) or not (isinstance(size, int) or isinstance(size, SupportsIndex)):
        raise _InvalidSizeTypeError(f"{what}: size must be an int, not {type(size).__name__} ({size!r})")
    value = operator.index(size)
    if value <= 0:
        raise InvalidSizeError(f"{what}: size must be > 0 bytes, got {value}")
    return value


def _gaps(written: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of [0, size) that no (offset, length) in *written* covers."""
    out = []
    at = 0
    for lo, n in sorted(written):
        if lo > at:
            out.append((at, lo - at))
        at = max(at, lo + n)
    if at < size:
        out.append((at, size - at))
    return out


# Gaps a recycled segment's fill did not write are zeroed in pieces of this size.
_ZERO_CHUNK = 4 << 20


def _user_writer(size: int, raw: Callable[[memoryview, int], None],
                 written: list[tuple[int, int]] | None = None) -> Callable[[memoryview, int], None]:
    """The ``write(data, offset)`` a fill gets: user offsets, bounds-checked, onto *raw* (file offsets).

    *written*, when given, records each (offset, length), so the bytes no
    write covered can be zeroed.
    """
    def write(data: memoryview, offset: int) -> None:
        if offset < 0 or offset + data.nbytes > size:
            raise ValueError(f"write of {data.nbytes} bytes at {offset} overruns {size}")
        raw(data, PAGE_SIZE + offset)
        if written is not None:
            written.append((offset, data.nbytes))
    return write


def no_space(what: str, label: str | None, key: str | None, directory: str | None,
             needed: int | None = None, cause: str = "") -> OutOfResourcesError:
    """The one out-of-space message: what was needed, what the directory holds, and what to do about it."""
    where = directory or backend.SHM_DIR
    need = f"needs {_human(needed)}" if needed is not None else f"is out of space ({cause or 'no space left'})"
    return OutOfResourcesError(
        f"{what}: segment {label!r} {need} but {where} has {_human(backend.free_bytes(directory))} free "
        f"(of {_human(backend.total_bytes(directory))}); remove segments (`shmarray gc`, `shmarray rm KEY`), "
        f"make it smaller, or enlarge {where}", key)


#: Why a segment can be missing, said wherever NotFoundError names a key that nothing holds.
LIFETIME_RULE = ("A segment lives while some process holds it (an array, a view or a table of it): keep one "
                 "alive, or create it with persistent=True.")


def missing(what: str, key: str | None, directory: str | None = None, native: str | None = None) -> NotFoundError:
    """NotFoundError for a name with no segment, saying why as far as it can be told from outside.

    A missing directory is named; a Qt program's (or another library's)
    object under the key's Qt names is pointed to ``attach_qt``; otherwise
    the key was never created or its last holder detached or exited.
    """
    where = directory or backend.SHM_DIR
    label = key if key is not None else native
    problem = backend.dir_problem(where, writable=False)
    if problem is not None:
        return NotFoundError(f"{what}: no segment {label!r}: the segment directory {where!r} {problem}", key)
    if key is None:
        return NotFoundError(f"{what}: there is no object {native!r} in {where}", key)
    for name in qt_posix_names(key):
        if backend.name_facts("/dev/shm/" + name) is not None:
            return NotFoundError(
                f"{what}: no shmarray segment {key!r}, but /dev/shm/{name} exists: a segment that a Qt "
                f"program's QSharedMemory made (map it with shmarray.attach_qt(key, dtype, shape) or "
                f"shmarray.qt.QSharedMemory) or another library's (Segment(native_key={name!r}))", key)
    return NotFoundError(
        f"{what}: no segment {key!r} in {where}: it was never created, or the last process holding it "
        f"detached or exited. {LIFETIME_RULE}", key)


def _translate(e: OSError, what: str, key: str | None, directory: str | None = None) -> ShmError:
    """An OSError from the OS layer as the ShmError a user should see (*directory*: the segment's)."""
    code = e.errno
    if code == errno.ENOENT:
        return missing(what, key, directory)
    if code == errno.EEXIST:
        return AlreadyExistsError(f"{what}: segment {key!r} already exists", key)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDeniedError(f"{what}: permission denied for segment {key!r} ({e.strerror})", key)
    hint = backend.limits_hint(code) if code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) else ""
    if hint:
        return OutOfResourcesError(f"{what}: out of resources for segment {key!r}: {hint}", key)
    if code in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EOVERFLOW):
        return no_space(what, key, key, directory, cause=e.strerror or "")
    if code in (errno.EMFILE, errno.ENFILE):
        return OutOfResourcesError(f"{what}: out of resources for segment {key!r} ({e.strerror})", key)
    return UnknownShmError(f"{what}: {e.strerror or e} (segment {key!r})", key)




# -- building (publication by link(2), in a fresh or a recycled file) --------------------------


def _build(where: Where, name: str, size: int, mode: AccessMode, persistent: bool, permissions: int,
           fill: Fill | None, reserve: bool) -> _Attachment:
    """A new segment file, written completely (control block and *fill*), then published under *name*."""
    recycle = not persistent
    if recycle:
        taken = kept_files.take(PAGE_SIZE + size, where.dir)
        if taken is not None:
            return _build_in(where, taken, name, size, mode, fill)
    pid = backend.getpid()
    _watch.building_in(where.dir)  # a death mid-build leaves a temp file: the watcher removes it
    temp = backend.qualify(where.dir, f"{TEMP_PREFIX}{pid}-{backend.token_hex(6)}")
    fd = backend.create_exclusive(temp, permissions)
    published = False
    kept: str | None = None
    try:
        backend.chmod(fd, permissions)  # exactly what was asked, whatever the umask
        # Locked before anything else, so gc never mistakes it for an orphan.
        backend.hold_liveness(fd, pid)
        total = PAGE_SIZE + size
        populated = None
        if total >= backend.HUGE_PAGE and backend.huge_pages(where.dir) == "advise":
            # Huge pages only for a mapping that asks: fill through one (writes via
            # the fd would allocate 4 KiB pages), its pages allocated up front.
            backend.truncate(fd, total)
            populated = backend.map_populated_huge(fd, total)
        if populated is not None:
            mm = populated

            def write(data: memoryview, at: int) -> None:
                backend.copy_into(mm, at, data)
        else:
            if reserve:
                backend.reserve(fd, total)
            else:
                backend.truncate(fd, total)

            def write(data: memoryview, at: int) -> None:
                backend.pwrite_all(fd, data, at)
        try:
            control = control_bytes(size, persistent, where.key, new_incarnation())
            write(memoryview(control), 0)
            if fill is not None:
                fill(_user_writer(size, write))
        finally:
            if populated is not None:
                del write, mm
                backend.close_mapping(populated)
        if recycle:
            kept = kept_files.keep(temp, name, total, fd)
        _publish(where, temp, name)
        published = True
        att = _Attachment(name, fd, True, mode, foreign=False)
        att.ident = backend.identity(fd)
        att.map(ControlBlock(control))
        return att
    except BaseException:
        if published:
            backend.unlink_if_same(name, fd)
        kept_files.forget(kept)
        backend.close(fd)
        raise
    finally:
        backend.unlink(temp)

def _build_in(where: Where, taken: kept_files.Taken, name: str, size: int, mode: AccessMode,
              fill: Fill | None) -> _Attachment:
    """Build the new segment in a recycled file (claimed: nobody attached, nobody maps it).

    Writes go through this process's idle mapping of the file when it has
    one (a memcpy into mapped pages), else through the fd into allocated
    pages. Every byte the fill does not write is zeroed: nothing of the
    segment that used the file before can be read in this one.
    """
    fd, kept = taken
    pid = backend.getpid()
    region = idle_maps.find_idle(kept.dev, kept.ino, 0, PAGE_SIZE + size, True)
    written: list[tuple[int, int]] = []
    published = False
    try:
        control = control_bytes(size, False, where.key, new_incarnation())
        raw_write: Callable[[memoryview, int], None]
        if region is not None:
            warm = region

            def raw_write(data: memoryview, at: int) -> None:
                # Through the region, so that no reference to the mmap outlives
                # the build (a ReadOnly creator hands it back idle).
                backend.copy_into(warm.mm, at, data)
        else:
            def raw_write(data: memoryview, at: int) -> None:
                backend.pwrite_all(fd, data, at)
        # The whole control page: the old key's bytes must not linger after a shorter one.
        raw_write(memoryview(control + bytes(PAGE_SIZE - len(control))), 0)
        if fill is not None:
            fill(_user_writer(size, raw_write, written))
        gaps = _gaps(written, size)
        zeros = memoryview(bytes(min(_ZERO_CHUNK, max(n for _, n in gaps)))) if gaps else None
        for lo, n in gaps:
            assert zeros is not None
            for at in range(lo, lo + n, _ZERO_CHUNK):
                raw_write(zeros[: min(_ZERO_CHUNK, lo + n - at)], PAGE_SIZE + at)
        # Exclusive -> shared (atomic), plus this process's marker: attached.
        backend.hold_liveness(fd, pid)
        _publish(where, kept.name, name)
        published = True
        kept_files.published(kept, name)
        att = _Attachment(name, fd, True, mode, foreign=False)
        att.ident = (kept.dev, kept.ino)
        cb = ControlBlock(control)
        att.map(cb, region=region)
        return att
    except BaseException:
        if published:
            backend.unlink_if_same(name, fd)
        # Back to a dead kept file: whoever looks at it again sees it so.
        try:
            _mark_dead(fd)
        except OSError:  # pragma: no cover
            pass
        if region is not None:
            idle_maps.release(region)
        backend.close(fd)
        raise

def _publish(where: Where, source: str, name: str) -> None:
    """Give the built file *source* its public *name* (link(2): of racing creators one wins)."""
    while not backend.link(source, name):
        if not _reap_if_dead(name):
            raise AlreadyExistsError(
                f"create: segment {where.label!r} already exists; attach() to it, "
                f"or unlink it first (shmarray.unlink / `shmarray rm`)", where.key)


def publish_block(where: Where, name: str, block_fd: int, source: str, size: int, persistent: bool,
                  head: bytes, room: int) -> _Attachment:
    """Publish as segment *name* a file whose data is in place already (an ``allocating()`` array's): no copy.

    The file (open as *block_fd*, hidden name *source*) has room for the
    control page and, in the first *room* user bytes, for *head* (payload
    header and descriptor); its data follows. Both are written, then the
    name is linked as ``_build`` does; the attachment (ReadWrite) is
    registered. Raises ShmError.
    """
    control = control_bytes(size, persistent, where.key, new_incarnation())
    try:
        fd = backend.reopen(block_fd, True)
    except OSError as e:
        raise _translate(e, "share", where.label, where.dir) from e
    published = False
    try:
        backend.hold_liveness(fd, backend.getpid())
        backend.pwrite_all(fd, memoryview(control + bytes(PAGE_SIZE - len(control))), 0)
        backend.pwrite_all(fd, memoryview(head + bytes(room - len(head))), PAGE_SIZE)
        _publish(where, source, name)
        published = True
        att = _Attachment(name, fd, True, AccessMode.ReadWrite, foreign=False)
        att.ident = backend.identity(fd)
        att.map(ControlBlock(control))
        register(att)
        return att
    except BaseException as e:
        if published:
            backend.unlink_if_same(name, fd)
        backend.close(fd)
        if isinstance(e, OSError) and not isinstance(e, ShmError):
            raise _translate(e, "share", where.label, where.dir) from e
        raise


# -- opening ----------------------------------------------------------------------------------


def open_named(where: Where, name: str, mode: AccessMode) -> _Attachment:
    """This process's attachment of the segment *name* has now: the one it holds, else a new one (registered).

    Raises ShmError, or the OSError of the OS (FileNotFoundError when there is no such name).
    """
    now = backend.name_facts(name) if holds_name(name, mode) else None
    if now is not None:
        att = share_named(name, mode, now[0], now[1])
        if att is not None:
            if not att.foreign or where.key is None:
                return att
            release_user(att)  # a key names no foreign object: the full attach says so
    att = _open_new(where, name, mode)
    register(att)
    return att

def _open_new(where: Where, name: str, mode: AccessMode) -> _Attachment:
    label = where.label
    pid = backend.getpid()
    for _ in range(16):
        fd, map_fd, writable, object_size, dev, ino = backend.open_pair(name)
        try:
            if where.key is None:
                # A native key may name a foreign object: look before locking it.
                cb = parse_control(backend.pread(fd, PAGE_SIZE, 0), object_size)
                if cb is None:
                    att = _Attachment(name, fd, writable, mode, foreign=True)
                    map_fd, handed = -1, map_fd  # map() closes it, whatever happens
                    att.map(None, handed)
                    return att
            # Shared first: this waits out a destroyer holding the byte exclusively.
            # Then one read gives the control block as it is now (dead flag
            # included) and the start of the user bytes (the payload header).
            backend.hold_liveness(fd, pid)
            # The name must still be this file: a destroyer may have removed it
            # (and freed its pages) while we waited, and a recycled file may
            # hold another key's segment by now.
            now = backend.name_facts(name)
            if now is None or now[0] != dev or now[1] != ino:
                backend.close(map_fd)
                backend.close(fd)
                continue
            raw, cb = _read_control(fd, now[2])
            if cb is None:
                raise UnknownShmError(
                    f"attach: {name!r} (for key {label!r}) is not a shmarray segment; "
                    "remove it or use another key", where.key)
            if cb.dead:
                backend.close(map_fd)
                backend.close(fd)  # its only reference: the locks go with it
                continue
            if writable and not cb.persistent and not backend.others_attached(fd) and backend.try_sole(fd):
                # Nobody else is attached: every attacher died. (try_sole fails,
                # keeping our shared lock, if someone attached meanwhile.)
                _retire(fd, name)
                raise NotFoundError(
                    f"attach: segment {label!r} was left by processes that all died, so it has been "
                    f"removed. {LIFETIME_RULE}", where.key)
            map_fd, handed = -1, map_fd  # map() closes it, whatever happens
            return _attachment_of(name, fd, writable, mode, (dev, ino), raw, cb, handed)
        except BaseException:
            if map_fd >= 0:
                backend.close(map_fd)
            backend.close(fd)
            raise
    raise NotFoundError(f"attach: segment {label!r} kept disappearing; try again", where.key)


def _open_again(where: Where, held: _Attachment, mode: AccessMode) -> _Attachment:
    """An attachment in *mode* of the instance *held* is attached to (the name may be elsewhere by now)."""
    fd = backend.reopen(held.fd, held.writable_fd)
    try:
        backend.hold_liveness(fd, backend.getpid())
        raw, cb = _read_control(fd, backend.size_of(fd))
        if cb is None or cb.dead:  # pragma: no cover - we hold it attached
            raise NotFoundError(f"attach: segment {where.label!r} is gone", where.key)
        return _attachment_of(held.name, fd, held.writable_fd, mode, held.ident, raw, cb)
    except BaseException:
        backend.close(fd)
        raise


def _read_control(fd: int, object_size: int) -> tuple[bytes, ControlBlock | None]:
    """One pread: the control block as it is now and the first HEAD_BYTES of the user area."""
    raw = backend.pread(fd, PAGE_SIZE + HEAD_BYTES, 0)
    return raw, parse_control(raw[:PAGE_SIZE], object_size)


def _attachment_of(name: str, fd: int, writable: bool, mode: AccessMode, ident: tuple[int, int],
                   raw: bytes, cb: ControlBlock, map_fd: int | None = None) -> _Attachment:
    """The attachment over *fd* (liveness held), mapped; *map_fd* is kept or closed by map()."""
    att = _Attachment(name, fd, writable, mode, foreign=False)
    att.ident = ident
    att.head = raw[cb.data_offset :]
    att.map(cb, map_fd)
    return att


def _host_of(directory: str | None) -> int:
    """This process's host identity for segments of *directory* (0 when it has no such directory)."""
    try:
        return backend.host_identity(directory)
    except OSError:
        return 0


def check_usable(directory: str, what: str, *, writable: bool) -> None:
    """ShmError naming *directory* when segments cannot live there (NotFoundError when it is missing)."""
    problem = backend.dir_problem(directory, writable=writable)
    if problem is not None:
        cls = NotFoundError if not backend.name_facts(directory) else ShmError
        raise cls(f"{what}: the segment directory {directory!r} {problem}", None)


def check_dir(directory: "str | os.PathLike[str]") -> str | None:
    """A ``dir=`` argument as segments keep it: None for the default directory."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"dir must be a path (str or os.PathLike), not {type(directory).__name__}")
    d = backend.normal_dir(directory)
    return None if d == backend.SHM_DIR else d


