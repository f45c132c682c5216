"""Run test code in real processes, bounded by timeouts.

``run(fn, *args)`` runs ``fn`` in a fresh process (spawn by default) and
returns its result, re-raising its exception; a hang or a crash fails the
test instead of hanging the run. ``start`` gives a handle for processes the
test must drive (kill while holding a lock, ...). Targets must be
module-level functions of an importable module.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

__all__ = ["Child", "start", "run", "CONTEXTS", "wait_for", "run_with_small_dev_shm"]

CONTEXTS = ("spawn", "fork", "forkserver")
_ALL: list["Child"] = []


def _entry(conn: multiprocessing.connection.Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the test
        try:
            conn.send(("err", e, traceback.format_exc()))
        except Exception:
            conn.send(("err", RuntimeError(repr(e)), traceback.format_exc()))
    else:
        conn.send(("ok", result, ""))
    conn.close()


class Child:
    """A process running ``fn(*args)``; ``result()`` waits for what it returned."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], method: str) -> None:
        ctx = mp.get_context(method)
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_entry, args=(send, fn, args), daemon=True)
        self.process.start()
        send.close()
        _ALL.append(self)

    @property
    def pid(self) -> int:
        """The child's pid."""
        assert self.process.pid is not None
        return self.process.pid

    def result(self, timeout: float = 30.0) -> Any:
        """What the child returned; raises its exception, or TimeoutError / RuntimeError on a hang or crash."""
        if not self._recv.poll(timeout):
            self.kill()
            if self.process.exitcode not in (None, 0) and not self._recv.poll(0):
                raise RuntimeError(f"child died with exit code {self.process.exitcode}")
            raise TimeoutError(f"child {self.pid} gave no result within {timeout} s")
        try:
            status, value, tb = self._recv.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"child crashed (exit code {self.process.exitcode})") from None
        self.process.join(timeout)
        if status == "err":
            raise value from RuntimeError(f"in the child:\n{tb}")
        return value

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.join(10)

    def close(self) -> None:
        """Reap the child (killing it if still alive)."""
        self.kill()
        self._recv.close()


def start(fn: Callable[..., Any], *args: Any, method: str = "spawn") -> Child:
    """Start ``fn(*args)`` in a new process."""
    return Child(fn, args, method)


def run(fn: Callable[..., Any], *args: Any, method: str = "spawn", timeout: float = 30.0) -> Any:
    """Run ``fn(*args)`` in a new process and return its result."""
    child = start(fn, *args, method=method)
    try:
        return child.result(timeout)
    finally:
        child.close()


def reap_all() -> None:
    """Kill and reap every child still running (called after each test)."""
    while _ALL:
        _ALL.pop().close()


def wait_for(path: str, timeout: float = 30) -> None:
    """Wait until a child has written *path* (its "I am ready" mark)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def run_with_small_dev_shm(script: str, tmp_path: "os.PathLike[str]", size: str = "64m",
                           env: "dict[str, str] | None" = None) -> "subprocess.CompletedProcess[str]":
    """Run a Python *script* with a private segment directory of *size* (Docker's /dev/shm is 64m).

    Uses a private mount namespace (root and unshare(1)); skips the calling
    test where that is not possible.
    """
    import pytest

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    path = os.path.join(os.fspath(tmp_path), "small_shm.py")
    with open(path, "w") as f:
        f.write(script)
    # The segment directory under test (SHMARRAY_DIR in tests/test_second_dir.py's runs).
    where = os.environ.get("SHMARRAY_DIR") or "/dev/shm"
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size={size} tmpfs {where} && exec {sys.executable} {path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0 and "mount" in out.stderr and not out.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()}")
    return out
