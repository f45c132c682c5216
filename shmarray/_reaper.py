"""The watcher process (``_watch`` starts it): it frees what each of its processes alone held, when it dies.

Each process of the tree connects once and says what it holds: segments
(``H``), kept-file owners (``K``), directories it builds in (``D``), and its
own pid (``P``, for the names of its half-built files); a lower-case letter
takes one back. When a connection ends (its process died, however, or
exited), the watcher waits until the kernel has finished that exit (its
pidfd: every lock of the process is gone by then), and runs the retire
logic of the segment core on what it held:

- a segment nobody holds any more and that is not persistent is retired
  (``_attachment._reap_if_dead``: the kernel's liveness lock decides, so a
  segment held by anyone else, in this container or another, is untouched);
- the files it kept for reuse are freed (``kept_files.reap_owner``);
- its half-built files (``TEMP_PREFIX<pid>-``) are removed.

Every second, while anyone is connected, it also frees what dead processes
it did not watch left in the directories its processes use (the sweep a
``create()`` makes every few seconds): the init of a container, killed with
every process of its PID namespace (its own watcher included), leaves its
segments to the watchers of the other containers on the same tmpfs.

Connections of another user are refused. The watcher ends when no process
is connected any more (a process arriving after that starts another).
Nothing here raises to anyone: a failure to free one thing leaves it to
``shmarray gc``, as before.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import time

from ._attachment import _reap_if_dead, sweep_orphans
from ._os import PREFIX, TEMP_PREFIX, backend
from ._reuse import kept_files

__all__ = ["main", "reap", "sweep"]

# How long the watcher waits for a process whose connection ended to finish exiting.
_EXIT_WAIT = 1.5
# How often the watcher frees what dead processes it did not watch left in its processes'
# directories: a container's init killed with all of its namespace (its watcher too), a process
# that could not reach a watcher. The same sweep create() makes, every few seconds, today.
_SWEEP_EVERY = 1.0


class _Client:
    """One connected process and what it holds."""

    __slots__ = ("sock", "pid", "own_pid", "pidfd", "held", "buf")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid  # as this process sees it (SO_PEERCRED)
        self.own_pid = pid  # as it sees itself ("P"): its temp files carry this one
        self.pidfd = _pidfd(pid)
        self.held: dict[str, set[str]] = {"H": set(), "K": set(), "D": set()}
        self.buf = b""

    def directories(self) -> set[str]:
        """The segment directories this process uses."""
        return set(self.held["D"]) | {os.path.dirname(p) for p in self.held["H"]}

    def take(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            op, _, arg = line.decode("ascii", "replace").partition(" ")
            if op == "P":
                try:
                    self.own_pid = int(arg)
                except ValueError:
                    pass
                continue
            try:
                path = os.fsdecode(bytes.fromhex(arg))
            except ValueError:
                continue
            if op in self.held:
                self.held[op].add(path)
            elif op.upper() in self.held:
                self.held[op.upper()].discard(path)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # an old kernel, or the process is gone already
        return None


def _wait_exit(client: _Client) -> bool:
    """Wait until the process has finished exiting (its descriptors and locks gone), at most _EXIT_WAIT.

    False when it is still alive: it closed its connection itself (``SHMARRAY_WATCH=0`` was set, or it
    reconnected), so nothing may be taken from it that no lock protects (its half-built files).
    """
    deadline = time.monotonic() + _EXIT_WAIT
    if client.pidfd is not None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(client.pidfd, selectors.EVENT_READ)
            return bool(sel.select(_EXIT_WAIT))
        finally:
            sel.close()
            os.close(client.pidfd)
            client.pidfd = None
    while time.monotonic() < deadline:  # no pidfd: watch /proc
        try:
            with open(f"/proc/{client.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.01)
    return False


def reap(held: dict[str, set[str]], pid: int) -> list[str]:
    """Free what a dead process held (see the module's docstring); returns the paths freed."""
    freed: list[str] = []
    for path in sorted(held.get("H", ())):
        try:
            if backend.name_facts(path) is not None and _reap_if_dead(path):
                freed.append(path)
        except Exception:  # noqa: BLE001 - one segment's trouble must not stop the others
            pass
    for base in sorted(held.get("K", ())):
        try:
            freed += kept_files.reap_owner(base)
        except Exception:  # noqa: BLE001
            pass
    prefix = f"{TEMP_PREFIX}{pid}-"
    for directory in sorted(held.get("D", ())):
        try:
            names = [n for n in os.listdir(directory) if n.startswith(prefix)]
        except OSError:
            continue
        for n in names:
            try:
                os.unlink(os.path.join(directory, n))
                freed.append(os.path.join(directory, n))
            except OSError:
                pass
    return freed


def sweep(directories: set[str]) -> list[str]:
    """Free what dead processes left in *directories*: their kept files, and segments nobody holds."""
    freed: list[str] = []
    for directory in sorted(directories):
        try:
            freed += kept_files.reap_orphans(directory)
            freed += sweep_orphans([os.path.join(directory, n) for n in os.listdir(directory)
                                    if n.startswith(PREFIX)])
        except Exception:  # noqa: BLE001 - a directory gone or unreadable: next time
            pass
    return freed


def main(listen_fd: int) -> None:
    """Serve the processes that connect on *listen_fd* until none is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # this process's own: a stray Ctrl-C must not end it
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    me = os.getuid()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    clients: dict[int, _Client] = {}
    served = False
    started = swept = time.monotonic()
    while True:
        if not clients and (served or time.monotonic() - started > 30.0):
            _accept(listener, sel, clients, me)  # whoever is queued still counts
            if not clients:
                listener.close()  # nobody left: a process arriving now starts a watcher of its own
                break
        now = time.monotonic()
        if clients and now - swept >= _SWEEP_EVERY:
            swept = now
            sweep({d for c in clients.values() for d in c.directories()})
        for key, _ in sel.select(_SWEEP_EVERY):
            if key.fileobj is listener:
                _accept(listener, sel, clients, me)
                served = served or bool(clients)
                continue
            client = clients[key.fd]
            try:
                data = client.sock.recv(65536)
            except OSError:
                data = b""
            if data:
                client.take(data)
                continue
            sel.unregister(client.sock)
            del clients[key.fd]
            _finish(client)
    sel.close()


def _mount_namespace(pid: int | str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return -1


def _accept(listener: socket.socket, sel: selectors.BaseSelector, clients: dict[int, _Client], me: int) -> None:
    own_ns = _mount_namespace("self")
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
        except OSError:
            sock.close()
            continue
        theirs = _mount_namespace(pid)
        if uid != me or theirs not in (own_ns, -1):
            # Another user's process (what it says is none of ours to free), or one that sees
            # other files under the same paths (another mount namespace). A process already gone
            # (it died before the watcher came up) is served: it chose this watcher by its namespace.
            sock.close()
            continue
        sock.setblocking(True)
        client = _Client(sock, pid)
        clients[sock.fileno()] = client
        sel.register(sock, selectors.EVENT_READ)


def _finish(client: _Client) -> None:
    client.sock.close()
    if _wait_exit(client):
        reap(client.held, client.own_pid)
    else:  # alive: only what the kernel's locks guard (nothing it holds can be taken)
        reap({"H": client.held["H"], "K": client.held["K"]}, client.own_pid)
