"""Segment-level administration: list, inspect, unlink and garbage-collect segments.

Used by the CLI and by ``shmarray.ls()``; it reads control blocks through
the OS layer without attaching, so listing never changes a segment's life.
"""

from __future__ import annotations

import dataclasses

from . import _stash
from ._attachment import sweep_orphans
from ._control import CONTROL, MAGIC, PAGE_SIZE, parse_control
from ._stash import KEEP_PREFIX
from ._errors import NotFoundError, PermissionDeniedError
from ._os import PREFIX, TEMP_PREFIX, backend, check_key, check_native_key, native_key_for
from ._segment import Dir, _check_dir, check_usable

__all__ = ["SegmentInfo", "list_segments", "segment_info", "unlink_key", "unlink", "collect_garbage", "read_head"]


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """What ``shmarray ls`` shows about one segment."""

    native_key: str
    key: str | None
    size: int
    persistent: bool
    attached_pids: tuple[int, ...]
    attachments: int
    lock: str | None
    lock_holder: int | None
    creator_pid: int
    created: float
    shmarray: bool
    # Memory kept for reuse (a hidden name, see _stash): (owner alive, other names), else None.
    kept: tuple[bool, int] | None = None
    # The directory the segment lives in.
    dir: str = backend.SHM_DIR

    @property
    def orphan(self) -> bool:
        """True when nobody is attached and the segment is not persistent (gc removes it)."""
        return self.shmarray and self.kept is None and self.attachments == 0 and not self.persistent


def _where(directory: "Dir", what: str) -> str | None:
    """A ``dir=`` argument checked for reading: None for the default; ShmError naming a bad one."""
    d = _check_dir(directory) if directory is not None else None
    if d is not None:
        check_usable(d, what, writable=False)
    return d


def _read(name: str, directory: str | None = None) -> SegmentInfo | None:
    try:
        fd = backend.open_existing(backend.qualify(directory, name), False)
    except OSError:
        return None
    try:
        size = backend.size_of(fd)
        try:
            cb = parse_control(backend.pread(fd, PAGE_SIZE, 0), size)
        except Exception:
            cb = None
        dev, ino = backend.identity(fd)
        pids, attachments, lock, holder = backend.lock_report(dev, ino)
    finally:
        backend.close(fd)
    where = directory or backend.SHM_DIR
    if cb is None:
        return SegmentInfo(name, None, size, False, (), 0, None, None, 0, 0.0, False, dir=where)
    return SegmentInfo(
        native_key=name, key=cb.key, size=cb.size, persistent=cb.persistent,
        attached_pids=tuple(sorted(pids)), attachments=attachments, lock=lock,
        lock_holder=holder if lock else None, creator_pid=cb.creator, created=cb.created,
        shmarray=True, dir=where,
    )


def list_segments(*, include_foreign: bool = False, dir: "Dir" = None) -> list[SegmentInfo]:
    """Every shmarray segment in the segment directory (and, with *include_foreign*, other objects and kept memory).

    *dir* defaults to ``SHMARRAY_DIR``, else /dev/shm.
    """
    d = _where(dir, "list")
    out = []
    if not include_foreign:
        # Memory kept by processes that died goes whenever segments are listed;
        # the full listing (--all) is the one that shows it until then.
        _stash.reap_orphans(d)
    for name in sorted(backend.list_names(d)):
        if name.startswith(TEMP_PREFIX) or name.startswith(KEEP_PREFIX):
            continue
        if not include_foreign and not name.startswith(PREFIX):
            # Segments created by native key carry our magic under any name.
            try:
                fd = backend.open_existing(backend.qualify(d, name), False)
            except OSError:
                continue
            try:
                if backend.pread(fd, 8, 0) != MAGIC:
                    continue
            except OSError:
                continue
            finally:
                backend.close(fd)
        info = _read(name, d)
        if info is not None and (include_foreign or info.shmarray):
            out.append(info)
    if include_foreign:
        for name, pid, size, alive, nlink in _stash.kept_entries(d):
            out.append(SegmentInfo(name, None, size, False, (), 0, None, None, pid, 0.0, True,
                                   kept=(alive, nlink - 1), dir=d or backend.SHM_DIR))
    return out


def _name(key: str | None, native_key: str | None) -> tuple[str, str]:
    if native_key is not None:
        bare = check_native_key(native_key)
        return bare, native_key
    k = check_key(key)
    return native_key_for(k), k


def segment_info(key: str | None = None, *, native_key: str | None = None, dir: "Dir" = None) -> SegmentInfo:
    """The listing entry of one segment (in *dir*); NotFoundError if there is none."""
    name, label = _name(key, native_key)
    info = _read(name, _where(dir, "info"))
    if info is None:
        raise NotFoundError(f"no segment {label!r}; `shmarray ls` lists the segments there are", key)
    return info


def read_head(native_key: str, length: int, directory: str | None = None) -> bytes:
    """The first *length* user bytes of a shmarray segment, without attaching."""
    name = check_native_key(native_key)
    try:
        fd = backend.open_existing(backend.qualify(directory, name), False)
    except FileNotFoundError:
        raise NotFoundError(f"no segment {native_key!r}", None) from None
    try:
        cb = parse_control(backend.pread(fd, CONTROL.size, 0), backend.size_of(fd))
        offset = 0 if cb is None else cb.data_offset
        limit = length if cb is None else min(length, cb.size)
        return backend.pread(fd, limit, offset)
    finally:
        backend.close(fd)


def unlink_key(key: str | None = None, *, native_key: str | None = None, dir: "Dir" = None) -> None:
    """Remove a segment's name now (persistent or not); attached users keep their mappings."""
    name, label = _name(key, native_key)
    try:
        if not backend.unlink(backend.qualify(_where(dir, "unlink"), name)):
            raise NotFoundError(f"unlink: no segment {label!r}; nothing to remove", key)
    except PermissionError as e:
        raise PermissionDeniedError(f"unlink: permission denied for segment {label!r}", key) from e


def unlink(key: str, *, dir: "Dir" = None) -> None:
    """Remove the segment *key* now (persistent or not); attached users keep their memory.

    *dir* is the segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
    Raises NotFoundError when there is no such segment.
    """
    unlink_key(key, dir=dir)


def collect_garbage(*, dir: "Dir" = None) -> list[str]:
    """Remove segments nobody is attached to that are not persistent, and dead creators' leftovers.

    Returns the native names removed (in *dir*: default ``SHMARRAY_DIR``, else /dev/shm).
    """
    d = _where(dir, "gc")
    removed = _stash.reap_orphans(d)
    segments = []
    for bare in sorted(backend.list_names(d)):
        name = backend.qualify(d, bare)
        if bare.startswith(KEEP_PREFIX):
            continue  # kept by a live process (reap_orphans freed the dead ones')
        if bare.startswith(TEMP_PREFIX):
            # A creator's private object: gone when its creator is.
            try:
                fd = backend.open_existing(name, True)
            except OSError:
                continue
            try:
                if backend.try_sole(fd) and backend.unlink_if_same(name, fd):
                    removed.append(bare)
            finally:
                backend.close(fd)
            continue
        if bare.startswith(PREFIX):
            segments.append(name)
            continue
        # Segments made by native key carry our magic under any name.
        try:
            fd = backend.open_existing(name, False)
        except OSError:
            continue
        try:
            if backend.pread(fd, 8, 0) == MAGIC:
                segments.append(name)
        except OSError:  # a directory or something else unreadable: not ours
            pass
        finally:
            backend.close(fd)
    return removed + [backend.split_name(n)[1] for n in sweep_orphans(segments)]
