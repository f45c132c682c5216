"""The watcher: what a process alone held is freed within moments of its death, whatever killed it.

A process that holds segments (attached, created, or files kept for reuse)
tells a watcher what it holds, over a connection of its own. The kernel
closes that connection when the process ends, however it ends (SIGKILL, the
OOM killer, ``os._exit``, a segfault, a SIGTERM with no handler), and the
watcher then runs the retire logic a later shmarray call would run
(``_reaper``): every segment the process held that nobody holds any more
and that is not persistent is destroyed, its kept files are freed, and its
half-built files go. A segment someone else still holds is never touched:
the liveness check is the kernel's lock, as everywhere else.

No daemon to start, no signal handler installed. The first process that
needs one starts a watcher (a small Python process in a session of its own,
so a terminal's Ctrl-C or a kernel manager's kill of the process group does
not reach it) and names it in ``SHMARRAY_WATCHER`` (an abstract Unix socket,
so no file is left behind); processes started from it (spawned pool workers,
a notebook's helpers) inherit the name and connect to the same watcher. A
forked child connects on its own. The watcher serves only processes of its
own user (``SO_PEERCRED``), and ends once nobody is connected. A process
that cannot reach its watcher starts another; a process that cannot start
one goes on without (a later create, attach or ``shmarray gc`` still frees
what it leaves).

This module is the process's side: ``hold``/``release`` (segments),
``keep``/``unkeep`` (kept-file owners), ``building_in`` (directories where
half-built files may be left). Each is one small write on the connection.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING

from ._os import backend

if TYPE_CHECKING:
    import socket

__all__ = ["hold", "release", "keep", "unkeep", "building_in", "ENV", "disabled"]

#: The environment variable that names this process tree's watcher (its abstract socket).
ENV = "SHMARRAY_WATCHER"
#: Set to "0" to run without a watcher (a later shmarray call or ``shmarray gc`` frees what a death leaves).
SWITCH = "SHMARRAY_WATCH"

_lock = threading.RLock()
_fd = -1  # the connection, as a bare descriptor: it lives as long as the process (no object to collect)
_pid = 0  # the process the connection belongs to (a forked child makes its own)
_held: dict[tuple[str, str], int] = {}  # (kind, path) -> count: resent to a new watcher
_failed_at = 0.0
_child = 0  # the watcher this process started, reaped once it ends


def disabled() -> bool:
    """True when ``SHMARRAY_WATCH=0`` turns the watcher off."""
    return os.environ.get(SWITCH, "1") == "0"


def hold(name: str) -> None:
    """This process holds segment *name* (qualified or bare)."""
    _tell("H", backend.path_of(name), +1)


def release(name: str) -> None:
    """This process no longer holds segment *name*."""
    _tell("H", backend.path_of(name), -1)


def keep(base: str) -> None:
    """This process keeps files for reuse under the owner file *base*."""
    _tell("K", backend.path_of(base), +1)


def unkeep(base: str) -> None:
    """This process has freed what it kept under *base*."""
    _tell("K", backend.path_of(base), -1)


def building_in(directory: str | None) -> None:
    """This process builds segments in *directory* (its half-built files there go at its death)."""
    path = directory or backend.SHM_DIR
    with _lock:
        if ("D", path) not in _held:
            _tell("D", path, +1)


def _line(kind: str, path: str, delta: int) -> bytes:
    op = kind if delta > 0 else kind.lower()
    return f"{op} {os.fsencode(path).hex()}\n".encode()


def _tell(kind: str, path: str, delta: int) -> None:
    if disabled():
        return
    with _lock:
        key = (kind, path)
        count = _held.get(key, 0) + delta
        if count > 0:
            _held[key] = count
        else:
            _held.pop(key, None)
        first, gone = delta > 0 and count == 1, delta < 0 and count <= 0
        if not (first or gone):
            return
        fd = _connected()
        if fd < 0:
            return
        try:
            _send(fd, _line(kind, path, delta))
        except OSError:  # the watcher went: another one, told everything held now
            _drop()
            _connected()


def _send(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _connected() -> int:
    """The connection to this process's watcher (-1: none): made, or a watcher started, on first need."""
    global _fd, _pid, _failed_at
    pid = backend.getpid()
    if _fd >= 0 and _pid == pid:
        return _fd
    if _fd >= 0:  # inherited through a fork no hook saw: the parent's connection
        _close_inherited()
    import time

    if time.monotonic() - _failed_at < 5.0:
        return -1  # no watcher could be had a moment ago: do not try on every call
    sock = _connect(_ours(os.environ.get(ENV)))
    if sock is None:
        sock = _start()
    if sock is None:
        _failed_at = time.monotonic()
        return -1
    fd = sock.detach()
    try:
        _send(fd, b"".join([f"P {pid}\n".encode()] + [_line(k, p, 1) for (k, p) in _held]))
    except OSError:
        os.close(fd)
        _failed_at = time.monotonic()
        return -1
    _fd, _pid = fd, pid
    return fd


def _connect(name: str | None) -> socket.socket | None:
    if not name:
        return None
    import socket  # here: a process that holds no segment never loads it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        return None
    return sock


def _start() -> socket.socket | None:
    """Start a watcher on a fresh abstract socket, connect to it, and name it for the processes started from here."""
    global _child
    import socket

    _reap_child()
    name = f"shmarray-watch-{backend.getpid()}-{backend.token_hex(8)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
        listener.listen(64)
        fd = listener.fileno()
        os.set_inheritable(fd, True)  # the watcher's only inherited descriptor besides /dev/null
        package = os.path.dirname(os.path.abspath(__file__))
        # -I -S: no site, no user environment: the watcher imports only the few modules of the
        # segment core it needs (``_reaper``), through a stub of the package, never numpy.
        boot = ("import sys, types; m = types.ModuleType('shmarray'); m.__path__ = [sys.argv[1]]; "
                "sys.modules['shmarray'] = m; from shmarray._reaper import main; main(int(sys.argv[2]))")
        null = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2)]
        # posix_spawn, not subprocess: no object whose collection warns while the watcher runs, and
        # a session of its own (setsid).
        _child = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", boot, package, str(fd)],
                                os.environ, file_actions=null, setsid=True)
    except OSError:
        listener.close()
        return None
    sock = _connect(name)
    listener.close()  # the watcher has its own copy; the connection above is queued on it
    if sock is not None:
        os.environ[ENV] = f"{name}:{_mount_namespace()}"
    return sock


def _mount_namespace() -> int:
    """This process's mount namespace: a watcher resolves the paths it is told in its own."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:  # no /proc: one namespace as far as anyone here can tell
        return 0


def _ours(value: str | None) -> str | None:
    """The watcher named in *value* if it sees the same files as this process (its mount namespace), else None.

    A process in a mount namespace of its own (``unshare -m``, a container sharing the network
    namespace) sees another /dev/shm under the same path: it needs a watcher of its own.
    """
    if not value:
        return None
    name, _, ns = value.rpartition(":")
    return name if name and ns == str(_mount_namespace()) else None


def _reap_child() -> None:
    """Collect a watcher this process started that has ended (no zombie left behind for long)."""
    global _child
    if _child:
        try:
            done, _ = os.waitpid(_child, os.WNOHANG)
        except ChildProcessError:
            done = _child
        if done:
            _child = 0


def _drop() -> None:
    global _fd
    fd, _fd = _fd, -1
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def _close_inherited() -> None:
    """In a forked child: close the parent's connection (closing is not shutting down: the parent's stays up)."""
    _drop()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    _close_inherited()
    # What the parent held is the parent's; the child tells its own (its attachments hold them again).
    _held.clear()


backend.register_after_fork_in_child(_after_fork_in_child)
