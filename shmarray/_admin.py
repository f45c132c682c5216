"""Segment-level administration: unlink and garbage-collect segments, and the checks of key and ``dir=`` arguments the inspection shares.

Listing and inspecting are in ``_inspect``. Everything here works on names
and control blocks through the OS layer, without attaching.
"""

from __future__ import annotations

from typing import NamedTuple

from ._reuse import kept_files
from ._attachment import sweep_orphans
from ._control import MAGIC, PAGE_SIZE, parse_control
from ._errors import NotFoundError, PermissionDeniedError, ShmError, user_facing
from ._os import PREFIX, TEMP_PREFIX, backend, check_key, check_native_key, native_key_for
from ._lifecycle import Dir, check_usable
from ._lifecycle import check_dir as _check_dir
from ._reuse.kept_files import KEEP_PREFIX

__all__ = ["unlink_key", "unlink", "collect_garbage", "collect", "Removed"]


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


@user_facing
def unlink(key: str, *, dir: "Dir" = None) -> None:
    """Remove the segment *key* now (persistent or not); attached users keep their memory.

    The name is gone at once (``attach(key)`` fails, ``create(key)``
    succeeds); the memory goes when the last attached user detaches.

    Parameters
    ----------
    key : str
        The segment's key.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Raises
    ------
    NotFoundError
        When there is no such segment.

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> lut = shmarray.share("doc-unlink", np.arange(4), persistent=True)
    >>> shmarray.unlink("doc-unlink")
    >>> int(lut[3])                       # still mapped here
    3
    """
    unlink_key(key, dir=dir)


class Removed(NamedTuple):
    """One thing ``shmarray gc`` removed: its bare native name, its key (None if it has none), the bytes freed, what it was."""

    name: str
    key: str | None
    size: int
    what: str  # 'segment', 'unfinished' (a creator's object it died before publishing) or 'kept'

    def label(self) -> str:
        """How ``shmarray gc`` names it: the key, as ``rm`` and ``ls`` do, else the native name."""
        if self.what == "kept":
            pid = self.name[len(KEEP_PREFIX):].split("-", 1)[0]
            return f"memory kept for reuse by dead pid {pid} (/{self.name})"
        if self.what == "unfinished":
            return f"an unfinished segment (/{self.name})"
        return self.key if self.key is not None else f"/{self.name}"


def _facts(name: str) -> tuple[str | None, int]:
    """(key, usable size) of the segment *name*, as ``shmarray ls`` shows them; (None, file size) if unreadable."""
    fd = backend.open_existing(name, False)
    try:
        size = backend.size_of(fd)
        try:
            cb = parse_control(backend.pread(fd, PAGE_SIZE, 0), size)  # the key follows the fixed fields
        except ShmError:
            cb = None
        return (cb.key, cb.size) if cb is not None else (None, size)
    finally:
        backend.close(fd)


def collect(*, dir: "Dir" = None) -> list[Removed]:
    """What ``collect_garbage`` does, with each removal's key and size (``shmarray gc`` prints them)."""
    d = _where(dir, "gc")
    # The sizes are read before anything goes: a removed file has none to read.
    kept = {n: size if nlink <= 1 else 0 for n, _, size, alive, nlink in kept_files.kept_entries(d) if not alive}
    removed = [Removed(n, None, kept.get(n, 0), "kept") for n in kept_files.reap_orphans(d)]
    segments: dict[str, tuple[str | None, int]] = {}
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
                size = backend.size_of(fd)
                if backend.try_sole(fd) and backend.unlink_if_same(name, fd):
                    removed.append(Removed(bare, None, size, "unfinished"))
            finally:
                backend.close(fd)
            continue
        try:
            # Segments made by native key carry our magic under any name.
            if bare.startswith(PREFIX) or backend.peek(name, 8) == MAGIC:
                segments[name] = _facts(name)
        except OSError:  # a directory or something else unreadable: not ours; or gone meanwhile
            pass
    for name in sweep_orphans(list(segments)):
        key, size = segments[name]
        removed.append(Removed(backend.split_name(name)[1], key, size, "segment"))
    return removed


def collect_garbage(*, dir: "Dir" = None) -> list[str]:
    """Remove segments nobody is attached to that are not persistent, and dead creators' leftovers.

    ``shmarray gc`` prints each one's key and size. Listing (:func:`ls`)
    never frees anything; this does.

    Parameters
    ----------
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    list of str
        The native names removed.
    """
    return [r.name for r in collect(dir=dir)]
