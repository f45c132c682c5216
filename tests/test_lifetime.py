"""Lifetime across processes: crashes, races, gc, fork."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import shmarray
from _procs import run, start, wait_for
from conftest import SHM
from shmarray import Segment


def _exists(seg_or_name: str) -> bool:
    return os.path.exists(os.path.join(SHM, seg_or_name))


def _attach_and_wait(key: str, ready_path: str) -> None:
    seg = Segment(key).attach()
    seg.data[1] = 1
    with open(ready_path, "w") as f:
        f.write("attached")
    time.sleep(600)


def _start_attached(key: str, tmp_path, n: int):
    kids = []
    for i in range(n):
        ready = str(tmp_path / f"ready{i}")
        kids.append(start(_attach_and_wait, key, ready))
        wait_for(ready)
    return kids


def test_killed_attachers_do_not_keep_a_segment_alive(key, tmp_path):
    seg = Segment(key).create(16)
    name = seg.native_key
    kids = _start_attached(key, tmp_path, 3)
    assert shmarray.segment_info(key).attachments == 4
    assert len(shmarray.segment_info(key).attached_pids) == 4
    for k in kids:
        k.kill()
    assert shmarray.segment_info(key).attachments == 1
    seg.detach()
    assert not _exists(name)


def test_only_attacher_killed_makes_the_segment_dead_at_once(key, tmp_path, unwatched):
    seg = Segment(key).create(16)
    name = seg.native_key
    kids = _start_attached(key, tmp_path, 1)
    seg.detach()
    assert _exists(name)  # the child still holds it
    kids[0].kill()
    assert _exists(name)  # nobody has looked yet...
    with pytest.raises(shmarray.NotFoundError, match="died"):
        Segment(key).attach()  # ...and the first look removes it
    assert not _exists(name)


def test_create_succeeds_over_a_dead_segment(key, tmp_path):
    seg = Segment(key).create(16)
    kids = _start_attached(key, tmp_path, 1)
    seg.detach()
    kids[0].kill()
    with Segment(key).create(32) as fresh:  # no gc needed
        assert fresh.size == 32 and fresh.data[1] == 0


def test_gc_removes_orphans_and_keeps_persistent(make_key, tmp_path, unwatched):
    orphan, keep, live = make_key(), make_key(), make_key()
    Segment(keep).create(16, persistent=True).detach()
    a = Segment(orphan).create(16)
    kids = _start_attached(orphan, tmp_path, 1)
    a.detach()
    held = Segment(live).create(16)  # before the kill: create() also sweeps orphans now
    kids[0].kill()
    names = {k: shmarray._os.native_key_for(k) for k in (orphan, keep, live)}
    listed = {i.key: i for i in shmarray.list_segments()}
    assert listed[orphan].orphan and not listed[keep].orphan and not listed[live].orphan
    removed = shmarray.collect_garbage()
    assert names[orphan] in removed
    assert names[keep] not in removed and names[live] not in removed
    assert not _exists(names[orphan]) and _exists(names[keep]) and _exists(names[live])
    held.detach()
    shmarray.unlink(keep)


def _create_race(key: str, folder: str, me: int, n: int) -> str:
    # A barrier, not a clock: on a loaded machine spawning eight children can take
    # longer than any fixed head start.
    open(os.path.join(folder, f"ready-{me}"), "w").close()
    wait_for(os.path.join(folder, "go"), timeout=90)
    try:
        seg = Segment(key).create(4096)
    except shmarray.AlreadyExistsError:
        open(os.path.join(folder, f"tried-{me}"), "w").close()
        return "exists"
    seg.data[0] = 1
    # Stay attached until every other creator has tried.
    deadline = time.monotonic() + 90
    while sum(name.startswith("tried-") for name in os.listdir(folder)) < n - 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    seg.detach()
    return "created"


@pytest.mark.timeout(240)
def test_eight_racing_creators_one_wins(key, tmp_path):
    folder = str(tmp_path)
    kids = [start(_create_race, key, folder, i, 8) for i in range(8)]
    deadline = time.monotonic() + 120
    while sum(name.startswith("ready-") for name in os.listdir(folder)) < 8:
        assert time.monotonic() < deadline, "the creators did not start"
        time.sleep(0.01)
    open(os.path.join(folder, "go"), "w").close()
    results = sorted(k.result(120) for k in kids)
    assert results == ["created"] + ["exists"] * 7
    assert not _exists(shmarray._os.native_key_for(key))
    temps = tuple(f".shmarray-tmp-{k.pid}-" for k in kids)
    assert not [n for n in os.listdir(SHM) if n.startswith(temps)]


def _in_forked_child(key: str) -> tuple[int, int]:
    seg = Segment(key).attach()
    attachments_before = shmarray.segment_info(key).attachments
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: attached in its own right
        os.close(r)
        try:
            n = shmarray.segment_info(key).attachments
            seg.data[0] = 42
            seg.detach()  # must not drop the parent's liveness lock
            os.write(w, n.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(w)
    n_child = int.from_bytes(os.read(r, 4), "little")
    os.waitpid(pid, 0)
    after = shmarray.segment_info(key).attachments
    ok = seg.data[0] == 42 and after == attachments_before
    seg.detach()
    return n_child - attachments_before, int(ok)


def test_fork_child_is_attached_in_its_own_right(key):
    with Segment(key).create(16):
        # Fork from a clean spawned process, not from pytest itself.
        assert run(_in_forked_child, key) == (1, 1)


def _fork_while_locked(key: str) -> tuple[bool, bool]:
    seg = Segment(key).attach()
    seg.lock()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if seg.lock_held is not None or seg.unlock():
                code = 3  # the child must not think it holds the parent's lock
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    other = Segment(key).attach()
    still_held = other.lock(timeout=0) is False  # the parent still holds it
    seg.unlock()
    other.detach()
    seg.detach()
    return os.waitstatus_to_exitcode(status) == 0, still_held


def test_fork_child_does_not_hold_the_parents_lock(key):
    with Segment(key).create(16):
        assert run(_fork_while_locked, key) == (True, True)


_KEEP: list[Segment] = []


def _exit_without_detach(key: str) -> None:
    seg = Segment(key).attach()
    seg.data[2] = 2
    _KEEP.append(seg)  # still attached when the interpreter exits: exit detaches it


def test_exit_detaches(key):
    with Segment(key).create(16) as seg:
        run(_exit_without_detach, key)
        assert shmarray.segment_info(key).attachments == 1
        assert seg.data[2] == 2


def _create_and_exit(key: str) -> None:
    Segment(key).create(16)


def test_exit_of_the_last_user_destroys(key):
    run(_create_and_exit, key)
    assert not _exists(shmarray._os.native_key_for(key))


# -- the unmap after share(): no LRU activation -------------------------------------------------------


def _vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k == name:
                return int(v)
    raise KeyError(name)


def _attach_sum_close_activations(key: str) -> tuple[float, int]:
    a = shmarray.attach(key)
    total = float(a.sum())
    before = _vmstat("pgactivate")
    a.close()
    del a
    return total, _vmstat("pgactivate") - before


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.mark.skipif(not _kernel_at_least(6, 3), reason="the unmap honours MADV_SEQUENTIAL from Linux 6.3")
def test_detach_after_share_does_not_activate_every_page(key):
    """share() writes with pwrite, which marks pages referenced; a reader's unmap would then move every
    page to the active LRU list (~45 ms at 512 MiB here). Detach advises the mapping first, so it does not."""
    src = np.arange(16 << 20, dtype=np.uint8)  # 4096 pages
    a = shmarray.share(key, src)
    total, activated = run(_attach_sum_close_activations, key)
    assert total == float(src.sum())
    assert activated < 4096 // 4, f"{activated} pages activated by one reader's unmap"
    a.close()


def test_views_keep_working_after_the_detach_advice(key):
    a = shmarray.share(key, np.arange(1 << 16, dtype=np.int64))
    b = shmarray.attach(key)
    view = b[10:20]
    b.close()
    view[:] = -1  # the mapping is still there, only advised
    assert list(a[10:20]) == [-1] * 10 and int(view.sum()) == -10
    del view, b
    a.close()


# -- the memory of a crashed pipeline comes back soon (issue 16) -----------------------------------


def _create_and_wait(key: str, ready: str) -> None:
    seg = Segment(key).create(8 << 20)
    seg.data[0] = 1
    open(ready, "w").close()
    time.sleep(300)


@pytest.mark.parametrize("how", ["create", "gc"])
def test_a_crashed_users_segment_is_freed_by_the_next_create_or_gc(make_key, tmp_path, how, unwatched):
    from shmarray._reuse import kept_files

    crashed = make_key()
    ready = str(tmp_path / "ready")
    child = start(_create_and_wait, crashed, ready)
    wait_for(ready)
    child.kill()
    path = os.path.join(SHM, shmarray._os.native_key_for(crashed))
    assert os.path.exists(path)  # nobody attached any more, and nobody looked yet
    if how == "create":
        kept_files._last_reap.clear()  # as if the last sweep were long ago
        other = Segment(make_key()).create(16)
        other.detach()
    else:
        # A listing shows what the dead user left and frees nothing: gc does, and says so.
        assert [e.orphan for e in shmarray.ls() if e.key == crashed] == [True]
        assert os.path.exists(path)
        assert shmarray._os.native_key_for(crashed) in shmarray.collect_garbage()
    assert not os.path.exists(path)
