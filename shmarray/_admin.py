"""Segment-level administration: unlink and garbage-collect segments, and the checks of key and ``dir=`` arguments the inspection shares.

Listing and inspecting are in ``_inspect``. Everything here works on names
and control blocks through the OS layer, without attaching.
"""

from __future__ import annotations

from . import _stash
from ._attachment import sweep_orphans
from ._control import MAGIC
from ._stash import KEEP_PREFIX
from ._errors import NotFoundError, PermissionDeniedError
from ._os import PREFIX, TEMP_PREFIX, backend, check_key, check_native_key, native_key_for
from ._segment import Dir, _check_dir, check_usable

__all__ = ["unlink_key", "unlink", "collect_garbage"]


def _where(directory: "Dir", what: str) -> str | None:
    """A ``dir=`` argument checked for reading: None for the default; ShmError naming a bad one."""
    d = _check_dir(directory) if directory is not None else None
    if d is not None:
        check_usable(d, what, writable=False)
    return d


def _name(key: str | None, native_key: str | None) -> tuple[str, str]:
    if native_key is not None:
        bare = check_native_key(native_key)
        return bare, native_key
    k = check_key(key)
    return native_key_for(k), k


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
            if backend.peek(name, 8) == MAGIC:
                segments.append(name)
        except OSError:  # a directory or something else unreadable: not ours
            pass
    return removed + [backend.split_name(n)[1] for n in sweep_orphans(segments)]
