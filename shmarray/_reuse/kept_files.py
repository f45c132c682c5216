"""Recycled pages: a creator keeps the files of its destroyed segments and builds the next ones in them.

A fresh tmpfs page is allocated and zeroed on first touch (figures:
benchmarks/results/notes.md, the ``create`` group's first-touch floor); a
copy into pages that are already allocated runs at memory speed. So a process that creates segments (a producer sharing one
array after another) keeps each segment's file under a hidden second name;
once the segment is destroyed (its public name gone, nobody attached, no
mapping of it anywhere), the next segment of a fitting size is written into
that file and published under its own public name with ``link(2)``.

Each segment directory has its own kept files (a link cannot cross file
systems), so a process keeps files per directory it creates segments in.
Names, in that directory::

    .shmarray-keep-<pid>-<token>       the owner: an empty file on which the keeping
                                       process holds an exclusive OFD lock for its life
    .shmarray-keep-<pid>-<token>.<n>   one kept file (a second name of a segment's file)

No key can collide with them (keys live under ``shmarray_``) and ``shmarray
ls`` does not list them as segments (``--all`` shows them as kept memory).

Lifetime:

- A kept file is reused only while its owner holds its liveness byte
  exclusively (nobody attached), the segment is dead (its destroyer marked
  it, or every attacher died), and no process maps it (``MAPPED_BYTE``).
- The bytes kept in a directory are bounded by ``idle_maps.budget(dir)``. Files
  of segments still alive count too; a new segment is kept only if it fits.
- Before a create would fail for lack of room, this process gives back its
  dead kept files, then every dead kept file in the directory (``give_back``).
- At a normal exit the owner frees what it kept (truncated, so the memory is
  back at once, even if another process keeps an idle mapping of it). When
  the owner is killed, its lock goes with it, and its watcher (``_watch``,
  ``_reaper``) frees its files within about a second (``reap_owner``). Where
  no watcher saw the death (``SHMARRAY_WATCH=0``, a killed cgroup, the init of
  a PID namespace), another watcher's sweep of the directory, the next process
  that creates segments, or ``shmarray gc`` frees them (``reap_orphans``);
  until then ``shmarray ls`` lists them as orphans and frees nothing.
"""

from __future__ import annotations

import atexit
import time
from typing import Callable, NamedTuple

from .. import _watch
from . import idle_maps
from .._attachment import _retire, sweep_orphans
from .._control import CONTROL, parse_control
from .._errors import ShmError
from .._os import PREFIX, backend

__all__ = ["KEEP_PREFIX", "keep", "hide", "forget", "take", "give_back", "reap_orphans", "maybe_reap",
           "kept_entries", "release_all"]

KEEP_PREFIX = ".shmarray-keep-"
# A kept file is reused for a segment at least this fraction of its size.
_MIN_FILL = 0.5
_REAP_EVERY = 2.0  # seconds between the orphan scans made by create()


class Kept:
    """One file this process keeps: its hidden name, the public name it last had, its size."""

    __slots__ = ("name", "public", "size", "dev", "ino", "since")

    def __init__(self, name: str, public: str, size: int, dev: int, ino: int) -> None:
        self.name = name
        self.public = public
        self.size = size
        self.dev = dev
        self.ino = ino
        self.since = time.monotonic()


class Taken(NamedTuple):
    """A kept file ready to be rewritten: *fd* holds its liveness byte exclusively."""

    fd: int
    kept: Kept


class _Owner:
    """What this process keeps in one directory (None: the default one); names are qualified."""

    __slots__ = ("pid", "dir", "base", "fd", "kept", "serial")

    def __init__(self, directory: str | None) -> None:
        self.pid = backend.getpid()
        self.dir = directory
        self.base = backend.qualify(directory, f"{KEEP_PREFIX}{self.pid}-{backend.token_hex(6)}")
        self.fd = backend.create_exclusive(self.base, 0o600)
        if not backend.try_sole(self.fd):  # pragma: no cover - a fresh private name
            backend.close(self.fd)
            raise OSError("could not lock a fresh keep owner file")
        self.kept: dict[str, Kept] = {}
        self.serial = 0
        _watch.keep(self.base)  # what it keeps is freed by the watcher if this process dies


_owners: dict[str | None, _Owner] = {}
_last_reap: dict[str | None, float] = {}
_exit_registered = False


def _owner(directory: str | None) -> _Owner | None:
    """This process's owner in *directory*, if it keeps anything there."""
    o = _owners.get(directory)
    return o if o is not None and o.pid == backend.getpid() else None


def _the_owner(directory: str | None) -> _Owner:
    global _exit_registered
    o = _owner(directory)
    if o is None:
        o = _owners[directory] = _Owner(directory)
        if not _exit_registered:
            atexit.register(_at_exit)
            _exit_registered = True
    return o


def _is_kept_file(bare: str) -> bool:
    """A kept file's bare name (an owner file has no serial)."""
    return bare.startswith(KEEP_PREFIX) and "." in bare[len(KEEP_PREFIX):]


def _kept_bytes(o: _Owner) -> int:
    return sum(k.size for k in o.kept.values())


def keep(temp: str, public: str, size: int, fd: int) -> str | None:
    """Give the new segment file *temp* (open as *fd*) a hidden name this process keeps; None when not kept.

    Kept in *temp*'s directory when reuse is on and the file fits that
    directory's budget (dead kept files are given back, oldest first, to
    make room).
    """
    directory = backend.split_name(temp)[0]
    cap = idle_maps.budget(directory)
    if cap <= 0 or size < idle_maps.MIN_KEEP or size > cap:
        return None
    o = _the_owner(directory)
    if _kept_bytes(o) + size > cap:
        _give_back_own(_kept_bytes(o) + size - cap, directory)
        if _kept_bytes(o) + size > cap:
            return None
    o.serial += 1
    name = f"{o.base}.{o.serial}"
    if not backend.link(temp, name):  # pragma: no cover - our own fresh name
        return None
    dev, ino = backend.identity(fd)
    o.kept[name] = Kept(name, public, size, dev, ino)
    return name


def hide(fd: int, directory: str | None) -> str:
    """A hidden name of this process's for the file open as *fd* (an ``allocating()`` array's, being shared).

    Named as a kept file, so a killed process's names are reaped as its kept
    files are; the caller (``_reuse.allocator``) removes it itself and never
    lists it among the files kept here.
    """
    o = _the_owner(directory)
    o.serial += 1
    name = f"{o.base}.{o.serial}"
    if not backend.link_fd(fd, name):  # pragma: no cover - our own fresh name
        raise FileExistsError(name)
    return name


def forget(name: str | None) -> None:
    """Drop a kept name whose segment was never published (its creation failed)."""
    if name is None:
        return
    o = _owner(backend.split_name(name)[0])
    if o is None:
        return
    o.kept.pop(name, None)
    backend.unlink(name)


def published(kept: Kept, public: str) -> None:
    """Record that a kept file now holds the segment named *public*."""
    kept.public = public


def _claim(name: str) -> int | None:
    """Open a kept file and take it: nobody attached, nobody maps it. Its fd, or None."""
    try:
        fd = backend.open_by_name(name)
    except OSError:
        return None
    try:
        if backend.try_sole(fd) and not backend.mapped_elsewhere(fd):
            return fd
    except OSError:  # pragma: no cover - the fd is ours
        pass
    backend.close(fd)  # its only fd: an exclusive lock taken goes with it
    return None


def _dead_segment(fd: int, kept: Kept) -> bool:
    """With the file claimed: True when the segment it held is gone for every user (marked so if needed)."""
    try:
        cb = parse_control(backend.pread(fd, CONTROL.size, 0), backend.size_of(fd))
    except (ShmError, OSError):
        return False
    if cb is None or cb.persistent:
        return False
    if not cb.dead:
        # Nobody is attached (we hold the byte exclusively): every attacher died.
        # Retire it as an attacher would, so its public name goes too.
        _retire(fd, kept.public)
    return backend.name_identity(kept.public) != (kept.dev, kept.ino)


def take(total: int, directory: str | None) -> Taken | None:
    """A dead kept file in *directory* of at least *total* bytes (and not much more) to build a new segment in."""
    o = _owner(directory)
    if o is None or not o.kept or idle_maps.budget(directory) <= 0:
        return None
    fits = sorted((k for k in o.kept.values() if total <= k.size and total >= k.size * _MIN_FILL),
                  key=lambda k: k.size)
    for k in fits:
        fd = _claim(k.name)
        if fd is None:
            if backend.name_identity(k.name) != (k.dev, k.ino):
                o.kept.pop(k.name, None)  # removed from outside (gc of another run, rm)
            continue
        if backend.fd_facts(fd)[2] >= k.size and _dead_segment(fd, k):
            return Taken(fd, k)
        backend.close(fd)
    return None


def _free(name: str, fd: int | None) -> bool:
    """Remove a kept name; its pages are freed now when no other name or mapping holds them.

    *fd*, when given, has the file claimed. True when the name is gone.
    """
    if fd is None:
        fd = _claim(name)
    if fd is None:
        # In use (attached, or mapped by a live view): only the hidden name goes;
        # the segment lives on under its public name, if it has one.
        return backend.unlink(name) or True
    try:
        dev, ino, _, nlink = backend.fd_facts(fd)
        backend.unlink(name)
        if nlink <= 1:
            backend.release_pages(fd)
            idle_maps.forget_file(dev, ino)
        return True
    finally:
        backend.close(fd)


def _give_back_own(need: int | None, directory: str | None) -> int:
    """Free dead kept files of this process in *directory*, oldest first, until *need* bytes (None: all).

    Returns the bytes freed.
    """
    o = _owner(directory)
    if o is None:
        return 0
    freed = 0
    for k in sorted(o.kept.values(), key=lambda k: k.since):
        if need is not None and freed >= need:
            break
        fd = _claim(k.name)
        if fd is None:
            continue  # alive: not ours to free
        if _dead_segment(fd, k):
            o.kept.pop(k.name, None)
            _free(k.name, fd)
            freed += k.size
        else:
            backend.close(fd)
    return freed


def give_back(need: int, directory: str | None) -> int:
    """Free kept memory in *directory* before a create fails for lack of room: ours first, then any dead kept file."""
    freed = sum(also(directory) for also in _also_give_back)
    if freed >= need:
        return freed
    freed += _give_back_own(need - freed, directory)
    if freed >= need:
        return freed
    reap_orphans(directory)
    for bare in backend.list_names(directory):
        if not _is_kept_file(bare):
            continue
        name = backend.qualify(directory, bare)
        o = _owner(directory)
        if o is not None and name in o.kept:
            continue
        fd = _claim(name)
        if fd is None:
            continue
        try:
            nlink = backend.fd_facts(fd)[3]
            size = backend.size_of(fd)
        except OSError:  # pragma: no cover
            backend.close(fd)
            continue
        if nlink <= 1:  # only the hidden name: the segment it held is gone
            _free(name, fd)
            freed += size
        else:
            backend.close(fd)
        if freed >= need:
            break
    return freed


def _owner_of(bare: str) -> str:
    """The bare name of the owner file of a kept file's bare name."""
    return KEEP_PREFIX + bare[len(KEEP_PREFIX):].split(".", 1)[0]


def reap_owner(base: str) -> list[str]:
    """Free the kept files of the owner file *base* (a path) if its process is gone (its lock is free).

    The watcher's call when that process's connection ends (``_reaper``). Returns the bare names removed.
    """
    directory, bare = backend.split_name(backend.path_of(base))
    return reap_orphans(directory, only=bare)


def reap_orphans(directory: str | None = None, *, only: str | None = None) -> list[str]:
    """Free the kept files in *directory* of processes that died (their owner file's lock is free).

    *only*: the bare name of one owner file, whose files alone are looked at.
    Returns the bare names removed.
    """
    if only is None:
        _last_reap[directory] = time.monotonic()
    names = [n for n in backend.list_names(directory) if n.startswith(KEEP_PREFIX)
             and (only is None or _owner_of(n) == only)]
    if not names:
        return []
    o = _owner(directory)
    mine = backend.split_name(o.base)[1] if o is not None else None
    owners = {n for n in names if not _is_kept_file(n)}
    removed: list[str] = []
    dead_owners: dict[str, int | None] = {}
    for base in {_owner_of(n) for n in names}:
        if base == mine:
            continue
        if base not in owners:
            dead_owners[base] = None  # its files outlived it (killed between two unlinks)
            continue
        try:
            fd = backend.open_by_name(backend.qualify(directory, base))
        except OSError:
            continue
        if backend.try_sole(fd):
            dead_owners[base] = fd  # held until its files are gone, so two reapers never race
        else:
            backend.close(fd)
    for base, owner_fd in dead_owners.items():
        for n in names:
            if n != base and _owner_of(n) == base and _free(backend.qualify(directory, n), None):
                removed.append(n)
        if owner_fd is not None:
            backend.unlink_if_same(backend.qualify(directory, base), owner_fd)
            backend.close(owner_fd)
            removed.append(base)
    return removed


def maybe_reap(directory: str | None) -> None:
    """reap_orphans() and the segments whose users all died in *directory*, at most every few seconds.

    create() calls this, so that the memory of a crashed pipeline returns
    without waiting for the next attach of its key or ``shmarray gc``.
    """
    if time.monotonic() - _last_reap.get(directory, -1e9) >= _REAP_EVERY:
        try:
            reap_orphans(directory)
            sweep_orphans(None if directory is None else
                          [backend.qualify(directory, n) for n in backend.list_names(directory)
                           if n.startswith(PREFIX)])
        except OSError:  # pragma: no cover - a listing race: next time
            pass


def kept_entries(directory: str | None = None) -> list[tuple[str, int, int, bool, int]]:
    """Every kept file in *directory*: (bare name, owner pid, size, owner alive, links)."""
    out = []
    owners_alive: dict[str, bool] = {}
    for n in sorted(backend.list_names(directory)):
        if not _is_kept_file(n):
            continue
        try:
            pid = int(n[len(KEEP_PREFIX):].split("-", 1)[0])
        except ValueError:
            pid = 0
        try:
            fd = backend.open_existing(backend.qualify(directory, n), False)
        except OSError:
            continue
        try:
            _, _, size, nlink = backend.fd_facts(fd)
        finally:
            backend.close(fd)
        base = _owner_of(n)
        if base not in owners_alive:
            owners_alive[base] = _owner_alive(backend.qualify(directory, base))
        out.append((n, pid, size, owners_alive[base], nlink))
    return out


def _owner_alive(base: str) -> bool:
    """True while the process that owns the kept files under *base* (qualified) holds its owner file's lock."""
    if any(o.base == base for o in _owners.values() if o.pid == backend.getpid()):
        return True
    try:
        fd = backend.open_existing(base, True)
    except OSError:
        return False
    try:
        return backend.others_attached(fd)
    finally:
        backend.close(fd)


# What else frees memory this process keeps (the allocator's pool: ``_reuse.allocator``):
# all of it, and (given a directory, returning the bytes freed) that of one directory.
_also_release: list[Callable[[], None]] = []
_also_give_back: list[Callable[[str | None], int]] = []


def release_all() -> None:
    """Free everything this process keeps, in every directory (the files and the idle mappings)."""
    for also in _also_release:
        also()
    idle_maps.drop_idle()
    for directory in list(_owners):
        o = _owner(directory)
        _owners.pop(directory, None)
        if o is None:
            continue
        for k in list(o.kept.values()):
            o.kept.pop(k.name, None)
            try:
                _free(k.name, None)
            except OSError:  # pragma: no cover - at exit: nothing better to do
                pass
        try:
            backend.unlink_if_same(o.base, o.fd)
        except OSError:  # pragma: no cover - its directory went away
            pass
        backend.close(o.fd)
        _watch.unkeep(o.base)


def _at_exit() -> None:
    # Segments still attached here keep their public names: only the hidden
    # names go now, and the detaches at exit (weakref finalizers, after this
    # hook) destroy them as usual, freeing the pages of any nameless file.
    release_all()


def _after_fork_in_child() -> None:
    for o in _owners.values():
        backend.close(o.fd)  # the parent's lock stays: the parent holds the description
    _owners.clear()


backend.register_after_fork_in_child(_after_fork_in_child)
