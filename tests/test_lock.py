"""The segment lock: modes, per-object semantics, timeouts, Ctrl-C, crash recovery."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest

import shmarray
from _procs import run, start, wait_for
from conftest import SHM
from shmarray import Segment

COUNTER = struct.Struct("<Q")


def test_lock_unlock(key):
    with Segment(key).create(8) as seg:
        assert seg.lock() is True
        assert seg.lock_held == "exclusive"
        assert seg.lock() is True  # again through the holder: at once
        assert seg.unlock() is True
        assert seg.unlock() is False
        assert seg.lock_held is None


def test_two_objects_exclude_each_other(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b:
        assert a.lock()
        assert b.lock(timeout=0) is False
        assert b.error is shmarray.SharedMemoryError.LockError
        a.unlock()
        assert b.lock(timeout=0) is True
        assert b.error is shmarray.SharedMemoryError.NoError
        b.unlock()


def test_shared_readers_and_exclusive_writer(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b, Segment(key).attach() as c:
        assert a.lock(shared=True) and b.lock(shared=True)
        assert c.lock(timeout=0) is False
        assert c.lock(timeout=0, shared=True) is True
        for s in (a, b, c):
            s.unlock()
        assert c.lock(timeout=0)
        assert a.lock(timeout=0, shared=True) is False
        c.unlock()


def test_exclusive_holder_asking_shared_keeps_exclusive(key):
    with Segment(key).create(8) as a:
        a.lock()
        assert a.lock(shared=True) is True and a.lock_held == "exclusive"
        a.unlock()


def test_upgrade_is_refused(key):
    with Segment(key).create(8) as a:
        a.lock(shared=True)
        with pytest.raises(shmarray.LockError, match="unlock"):
            a.lock()
        a.unlock()


def test_lock_timeout_takes_about_that_long(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b:
        a.lock()
        t = time.monotonic()
        assert b.lock(timeout=0.3) is False
        elapsed = time.monotonic() - t
        assert 0.25 <= elapsed < 2.0
        a.unlock()


def test_locked_context_manager(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b:
        with a.locked():
            assert a.lock_held == "exclusive"
            with a.locked():  # re-entrant use does not release the outer hold
                pass
            assert a.lock_held == "exclusive"
            with pytest.raises(shmarray.LockError, match="timed out"):
                with b.locked(timeout=0.05):
                    pass
        assert a.lock_held is None
        with b.locked(shared=True):
            assert b.lock_held == "shared"


def test_lock_needs_attachment(key):
    seg = Segment(key)
    with pytest.raises(shmarray.LockError):
        seg.lock()
    assert seg.error is shmarray.SharedMemoryError.LockError
    assert seg.unlock() is False


def test_threads_through_two_objects(key):
    with Segment(key).create(8) as seg:
        objs = [Segment(key).attach() for _ in range(4)]
        n = 500

        def work(s: Segment) -> None:
            data = s.data
            for _ in range(n):
                with s.locked():
                    (v,) = COUNTER.unpack_from(data, 0)
                    COUNTER.pack_into(data, 0, v + 1)

        threads = [threading.Thread(target=work, args=(s,)) for s in objs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert COUNTER.unpack_from(seg.data, 0)[0] == 4 * n
        for s in objs:
            s.detach()


def _count(key: str, n: int) -> int:
    with Segment(key).attach() as seg:
        data = seg.data
        for _ in range(n):
            with seg.locked():
                (v,) = COUNTER.unpack_from(data, 0)
                COUNTER.pack_into(data, 0, v + 1)
    return n


@pytest.mark.timeout(120)
def test_contended_counter_across_processes_is_exact(key):
    n = 3000
    with Segment(key).create(8) as seg:
        kids = [start(_count, key, n) for _ in range(3)]
        assert [k.result(90) for k in kids] == [n] * 3
        assert COUNTER.unpack_from(seg.data, 0)[0] == 3 * n


def _hold_until_killed(key: str, ready_path: str, shared: bool) -> None:
    seg = Segment(key).attach()
    seg.lock(shared=shared)
    seg.data[0] = 0xAB  # half-done work
    with open(ready_path, "w") as f:
        f.write("locked")
    time.sleep(600)


@pytest.mark.parametrize("blocking", [True, False])
def test_killed_holder_releases_and_is_reported(key, tmp_path, blocking):
    ready = str(tmp_path / "ready")
    with Segment(key).create(8) as seg:
        child = start(_hold_until_killed, key, ready, False)
        wait_for(ready)
        assert seg.lock(timeout=0) is False
        result: dict[str, float] = {}

        def waiter() -> None:
            got = seg.lock() if blocking else seg.lock(timeout=10)
            result["t"] = time.monotonic()
            result["got"] = got

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        t.join(10)
        assert result["got"] is True
        assert result["t"] - killed < 0.1
        assert seg.lock_recovered is True
        assert seg.data[0] == 0xAB
        seg.unlock()
        assert seg.lock(timeout=0) and seg.lock_recovered is False
        seg.unlock()
        child.close()


def test_killed_shared_holder_is_not_a_recovery(key, tmp_path):
    ready = str(tmp_path / "ready")
    with Segment(key).create(8) as seg:
        child = start(_hold_until_killed, key, ready, True)
        wait_for(ready)
        assert seg.lock(timeout=0) is False
        child.kill()
        assert seg.lock(timeout=5) is True
        assert seg.lock_recovered is False
        seg.unlock()


def _recovered_after_death(key: str) -> tuple[bool, bool]:
    with Segment(key).attach() as seg:
        got = seg.lock(timeout=5)
        rec = seg.lock_recovered
        seg.unlock()
        return got, rec


def test_recovery_seen_by_another_process(key, tmp_path):
    ready = str(tmp_path / "ready")
    with Segment(key).create(8):
        child = start(_hold_until_killed, key, ready, False)
        wait_for(ready)
        child.kill()
        assert run(_recovered_after_death, key) == (True, True)


def _block_then_report_interrupt(key: str) -> str:
    with Segment(key).attach() as seg:
        try:
            seg.lock()  # blocks: the parent holds it
        except KeyboardInterrupt:
            return "interrupted"
        return "acquired"


def _wait_blocked_in_lock(pid: int, timeout: float = 30) -> None:
    """Wait until /proc/locks lists *pid* as waiting for a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any("->" in line and f" {pid} " in line for line in f):
                return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} never blocked in lock()")


def test_ctrl_c_interrupts_a_blocked_lock(key):
    with Segment(key).create(8) as seg:
        seg.lock()
        child = start(_block_then_report_interrupt, key)
        _wait_blocked_in_lock(child.pid)
        os.kill(child.pid, signal.SIGINT)
        assert child.result(20) == "interrupted"
        seg.unlock()


def test_locked_keeps_no_cycle(key):
    """The reused `with seg.locked()` manager must not delay detach to a gc pass."""
    import gc

    gc.disable()
    try:
        seg = Segment(key).create(8)
        with seg.locked():
            pass
        name = seg.native_key
        del seg  # reference counting alone detaches and destroys it
        assert not os.path.exists(os.path.join(SHM, name))
    finally:
        gc.enable()


def test_locked_nests_and_threads_share_the_object(key):
    with Segment(key).create(8) as seg:
        with seg.locked():
            with seg.locked():
                assert seg.lock_held == "exclusive"
            assert seg.lock_held == "exclusive"
        assert seg.lock_held is None


# -- one timeout rule (issue 16) ---------------------------------------------------------------


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), ("1", TypeError), (True, TypeError),
                                     ([1], TypeError)])
def test_a_bad_timeout_is_refused_before_waiting(key, bad, exc):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    for contended in (False, True):
        if contended:
            assert a.segment.lock()
        with pytest.raises(exc, match="timeout"):
            b.segment.lock(bad)
        with pytest.raises(exc, match="timeout"):
            b.segment.lock(bad, shared=True)
        with pytest.raises(exc, match="timeout"):
            b.segment.locked(bad)
        with pytest.raises(exc, match="timeout"):
            b.lock(bad)
    a.segment.unlock()
    ring = shmarray.BatchRing.create(key + "-r", {"x": ((2,), "f4")}, slots=2)
    try:
        with pytest.raises(exc, match="timeout"):
            ring.acquire(bad)
        with pytest.raises(exc, match="timeout"):
            ring.get(bad)
        with pytest.raises(exc, match="timeout"):
            ring.batches(bad)
    finally:
        ring.close()


def test_good_timeouts(key):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    assert a.segment.lock()
    t0 = time.monotonic()
    assert b.segment.lock(0) is False and b.segment.lock(0.0) is False and b.segment.lock(0.05) is False
    assert time.monotonic() - t0 < 5
    a.segment.unlock()
    assert b.segment.lock(1)
    b.segment.unlock()


# -- each object's own description: the kernel excludes objects as it excludes processes ----------


def _hold_read_only_until_killed(key: str, ready_path: str) -> None:
    seg = Segment(key).attach(shmarray.AccessMode.ReadOnly)
    seg.lock()  # the mark goes through the descriptor: the mapping is read-only
    with open(ready_path, "w") as f:
        f.write("locked")
    time.sleep(600)


@pytest.mark.timeout(60)
def test_killed_read_only_holder_is_reported(key, tmp_path):
    ready = str(tmp_path / "ready")
    with Segment(key).create(8) as seg:
        child = start(_hold_read_only_until_killed, key, ready)
        wait_for(ready)
        assert seg.lock(timeout=0) is False
        child.kill()
        assert seg.lock(timeout=5) is True
        assert seg.lock_recovered is True
        seg.unlock()
        child.close()


def _wait_lock_then_report(key: str) -> bool:
    with Segment(key).attach() as seg:
        seg.lock()  # blocks: another process holds it
        recovered = seg.lock_recovered
        time.sleep(0.05)
        seg.unlock()
        return recovered


@pytest.mark.timeout(120)
def test_killed_holder_lets_every_blocked_process_in_and_one_reports_it(key, tmp_path):
    ready = str(tmp_path / "ready")
    with Segment(key).create(8):
        holder = start(_hold_until_killed, key, ready, False)
        wait_for(ready)
        waiters = [start(_wait_lock_then_report, key) for _ in range(2)]
        for w in waiters:
            _wait_blocked_in_lock(w.pid)
        holder.kill()
        # The first one in finds the dead holder's mark and clears it on unlock.
        assert sorted(w.result(30) for w in waiters) == [False, True]
        holder.close()


def _fork_while_holding(key: str, shared: bool) -> str:
    seg = Segment(key).attach()
    other = Segment(key).attach()
    assert seg.lock(shared=shared)
    pid = os.fork()
    if pid == 0:  # the child neither holds its parent's lock nor frees it, even when it detaches
        code = 0
        if seg.lock_held is not None:
            code = 3
        elif seg.unlock() is not False:
            code = 4
        elif seg.lock(timeout=0) is not False:  # exclusive: the parent's lock keeps it out
            code = 5
        seg.detach()
        other.detach()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    still = other.lock(timeout=0) is False  # the parent's hold survived the child
    seg.unlock()
    got = other.lock(timeout=0)
    other.unlock()
    seg.detach()
    other.detach()
    return f"{os.waitstatus_to_exitcode(status)} {still} {got}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shared", [False, True])
def test_forked_child_neither_holds_nor_frees_the_parents_lock(key, shared):
    with Segment(key).create(8):
        assert run(_fork_while_holding, key, shared) == "0 True True"


def test_unlock_from_another_thread_releases_the_objects_lock(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b:
        assert a.lock()
        done: list[bool] = []
        t = threading.Thread(target=lambda: done.append(a.unlock()))
        t.start()
        t.join(10)
        assert done == [True]
        assert b.lock(timeout=0) is True
        b.unlock()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_objects_lock_description_closes_with_it(key):
    with Segment(key).create(8):
        before = _open_fds()
        for _ in range(20):
            s = Segment(key).attach()
            assert s.lock() and s.unlock()
            assert s.lock(shared=True) and s.unlock()
            s.detach()
        t = Segment(key).attach()
        assert t.lock()
        del t  # collected while holding: released and closed
        assert _open_fds() == before
        with Segment(key).attach() as u:
            assert u.lock(timeout=0) is True and u.lock_recovered is False
            u.unlock()


def test_a_lock_on_the_fast_path_clears_the_error_state(key):
    with Segment(key).create(8) as a, Segment(key).attach() as b:
        assert b.lock() and b.unlock()  # the description is open: the next lock() takes the fast path
        assert a.lock()
        assert b.lock(timeout=0) is False
        assert b.error is shmarray.SharedMemoryError.LockError
        a.unlock()
        assert b.lock() is True
        assert b.error is shmarray.SharedMemoryError.NoError and b.error_string == ""
        b.unlock()


def test_threads_locking_a_fresh_object_at_once_share_one_description(key):
    with Segment(key).create(8) as seg:
        assert seg.lock() and seg.unlock()  # its own description is open from here on
        before = _open_fds()
        for _ in range(10):
            s = Segment(key).attach()
            start_line = threading.Barrier(6)
            got: list[bool] = []

            def first_lock(s: Segment = s, start_line: threading.Barrier = start_line) -> None:
                start_line.wait(10)
                got.append(s.lock(timeout=10))

            threads = [threading.Thread(target=first_lock) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert got == [True] * 6  # one object, one hold: every thread of it is let in
            assert s.unlock() is True
            assert seg.lock(timeout=0) is True  # nothing left holding it
            seg.unlock()
            s.detach()
        assert _open_fds() == before
