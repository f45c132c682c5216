"""SharedArray.lock(): takes the lock when called, as threading.Lock.acquire and Qt's lock() do.

The guard it returns releases on ``with`` exit; ``unlock()`` releases a bare
statement's hold. A second release is a LockError, never a release of
another hold. Threads sharing one array exclude each other; processes
exclude each other through the segment's lock.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import shmarray
from shmarray import LockError

from _procs import run, start, wait_for


def _try_lock(key: str, timeout: float, shared: bool = False) -> bool:
    a = shmarray.attach(key)
    try:
        a.lock(timeout=timeout, shared=shared)
    except LockError:
        return False
    a.unlock()
    return True


def _hold_with_bare_statement(key: str, ready: str, release: str) -> None:
    a = shmarray.attach(key)
    a.lock()  # a statement, its guard dropped at once: the lock stays held
    a[0] = 1.0
    open(ready, "w").close()
    wait_for(release, 30)
    a[0] = 2.0
    a.unlock()


def test_bare_lock_statement_holds_the_lock_against_another_process(key):
    a = shmarray.create(key, 4)
    a.lock()
    assert a.segment.lock_held == "exclusive"
    assert run(_try_lock, key, 0.3) is False
    assert run(_try_lock, key, 0.0, True) is False  # no reader either
    a.unlock()
    assert a.segment.lock_held is None
    assert run(_try_lock, key, 0.3) is True


def test_bare_lock_statement_in_another_process_excludes_us(key, tmp_path):
    a = shmarray.create(key, 4)
    ready, release = str(tmp_path / "ready"), str(tmp_path / "release")
    child = start(_hold_with_bare_statement, key, ready, release)
    wait_for(ready)
    with pytest.raises(LockError, match="timed out"):
        a.lock(timeout=0.3)
    open(release, "w").close()
    with a.lock(timeout=20):  # waits for the child's unlock()
        assert a[0] == 2.0
    child.result()


def test_with_form_releases_on_exit_and_gives_the_array(key):
    a = shmarray.create(key, 4)
    with a.lock() as same:
        assert same is a and a.segment.lock_held == "exclusive"
    assert a.segment.lock_held is None
    with pytest.raises(ZeroDivisionError):
        with a.lock(shared=True):
            assert a.segment.lock_held == "shared"
            1 / 0
    assert a.segment.lock_held is None
    assert run(_try_lock, key, 0.0) is True


def test_guard_release_and_unlock_rules(key):
    a = shmarray.create(key, 4)
    g = a.lock()
    assert g.held
    g.release()
    assert not g.held and a.segment.lock_held is None
    with pytest.raises(LockError, match="released already"):
        g.release()  # a double release
    with pytest.raises(LockError, match="not held"):
        a.unlock()  # an unlock of a lock not held
    # A stale guard never releases a later hold.
    h = a.lock()
    with pytest.raises(LockError, match="released already"):
        g.release()
    assert a.segment.lock_held == "exclusive" and h.held
    a.unlock()
    assert not h.held
    with pytest.raises(LockError, match="released already"):
        h.release()
    with pytest.raises(LockError):
        with h:  # a released guard cannot be entered
            pass
    # unlock() after `with` released: an error, not a silent success.
    with a.lock():
        pass
    with pytest.raises(LockError, match="not held"):
        a.unlock()


def test_reentrant_in_one_thread_each_hold_released_once(key):
    a = shmarray.create(key, 4)
    view = a[1:3]
    with a.lock():
        with view.lock(timeout=0):  # the same array's lock: re-entrant in this thread
            pass
        assert a.segment.lock_held == "exclusive"  # the inner exit kept the outer hold
        assert run(_try_lock, key, 0.0) is False
    assert a.segment.lock_held is None
    a.lock()
    a.lock(shared=True)  # a reader inside the writer's hold: still exclusive
    a.unlock()
    assert a.segment.lock_held == "exclusive"
    a.unlock()
    assert a.segment.lock_held is None
    with a.lock(shared=True):
        with pytest.raises(LockError, match="shared lock"):
            a.lock(timeout=0)  # no upgrade: two readers upgrading would deadlock


def test_threads_sharing_one_array_exclude_each_other(key):
    a = shmarray.create(key, 1, dtype="i8")
    n, threads = 300, 4

    def work() -> None:
        for _ in range(n):
            with a.lock():
                v = int(a[0])
                time.sleep(0)  # let another thread in if the lock did not exclude it
                a[0] = v + 1

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert int(a[0]) == n * threads


def test_another_thread_times_out_and_cannot_unlock(key):
    a = shmarray.create(key, 4)
    g = a.lock()
    seen: list[object] = []

    def other() -> None:
        for call in (lambda: a.lock(timeout=0.1), a.unlock):
            try:
                call()
                seen.append("no error")
            except LockError as e:
                seen.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert "another thread" in str(seen[0]) and "another thread" in str(seen[1])
    assert g.held and a.segment.lock_held == "exclusive"
    got: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        with a.lock(timeout=10):
            got.append(time.monotonic() - t0)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    g.release()
    t.join(10)
    assert got and got[0] >= 0.15


def test_readers_in_threads_share_and_the_last_one_out_releases(key):
    a = shmarray.create(key, 4)
    r1 = a.lock(shared=True)
    inside = threading.Event()
    leave = threading.Event()

    def reader() -> None:
        with a.lock(shared=True, timeout=1):
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(5)
    r1.release()  # the other thread still reads: the shared lock stays
    assert a.segment.lock_held == "shared"
    assert run(_try_lock, key, 0.0) is False  # a writer elsewhere waits
    assert run(_try_lock, key, 0.0, True) is True
    leave.set()
    t.join(10)
    assert a.segment.lock_held is None
    assert run(_try_lock, key, 0.0) is True


def test_timeout_and_the_lock_of_a_copy(key):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    with a.lock():
        t0 = time.monotonic()
        with pytest.raises(LockError, match=key):
            b.lock(timeout=0.2)
        assert time.monotonic() - t0 >= 0.15
    with pytest.raises((TypeError, ValueError)):
        a.lock(timeout=-1)
    with pytest.raises(LockError, match="copy"):
        (a + 1).view(shmarray.SharedArray).lock()
    with pytest.raises(LockError, match="copy"):
        (a + 1).view(shmarray.SharedArray).unlock()


def test_segment_lock_and_array_guard_together(key):
    """A hold taken through Segment.lock() (Qt's bool form) is borrowed by guards, never released by them."""
    a = shmarray.create(key, 4)
    assert a.segment.lock()
    with a.lock(timeout=0):
        pass
    assert a.segment.lock_held == "exclusive"
    assert a.segment.unlock()
    assert a.segment.lock_held is None


def _fork_child_lock(key: str) -> str:
    a = shmarray.attach(key)
    g = a.lock()
    pid = os.fork()
    if pid == 0:  # the child does not hold its parent's lock, and cannot release it
        code = 0
        try:
            g.release()
            code = 3
        except LockError:
            pass
        try:
            with a.lock(timeout=0.2):
                code = 4
        except LockError:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    g.release()
    return str(os.waitstatus_to_exitcode(status))


def test_fork_child_does_not_hold_the_parents_lock(key):
    a = shmarray.create(key, 4)
    assert run(_fork_child_lock, key) == "0"
    assert a.segment.lock_held is None
