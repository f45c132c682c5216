"""References that name their segment, and one attachment per process (issue 13).

Every SharedArray, view, table and unpickled reference of a segment in one
process shares one attachment (two descriptors, one mapping); a reference
names the segment instance (host and incarnation), so it never reads a
segment that replaced the one it was made from.
"""

from __future__ import annotations

import gc
import os
import pickle
import struct
import threading
import time

import numpy as np
import pytest

import shmarray
from shmarray._os import backend, native_key_for
from _procs import run, run_with_small_dev_shm, start, wait_for


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


_SHM_DEV = os.stat("/dev/shm").st_dev


def _inode(key: str) -> int:
    return os.stat(f"/dev/shm/{native_key_for(key)}").st_ino


def _maps_of(key: str, ino: int | None = None) -> int:
    """Mappings of segment *key*'s file (by inode: the name a creator opened is not the key's) here."""
    ino = _inode(key) if ino is None else ino
    dev = os.stat("/dev/shm").st_dev
    with open("/proc/self/maps") as f:
        rows = [line.split() for line in f]
    major, minor = os.major(dev), os.minor(dev)
    return sum(1 for r in rows if len(r) >= 5 and r[4] == str(ino) and r[3] == f"{major:02x}:{minor:02x}")


def _fds_of(key: str, ino: int | None = None) -> int:
    """Descriptors of this process open on segment *key*'s file."""
    ino = _inode(key) if ino is None else ino
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
            # The device too: a pipe or socket may carry the same small inode number as a
            # file in a fresh tmpfs.
            if st.st_ino == ino and st.st_dev == _SHM_DEV:
                n += 1
        except OSError:
            pass
    return n


# -- one attachment per process ---------------------------------------------------------------


def _hold_many_views(key: str, data: bytes, count: int, limit: int, ready: str, go: str) -> dict:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    views = [pickle.loads(data) for _ in range(count)]
    ino = _inode(key)
    facts = {"fds": _fds_of(key), "maps": _maps_of(key), "attachments_here": None,
             "all_same": all(v[3] == views[0][3] for v in views[:1000])}
    views[-1][0] = 123.0  # a write through an unpickled view: the creator must see it
    with open(ready, "w"):
        pass
    wait_for(go)
    facts["seen_back"] = float(views[0][1])  # the creator wrote it meanwhile
    del views
    gc.collect()
    facts["fds_after"] = _fds_of(key, ino)
    facts["maps_after"] = _maps_of(key, ino)
    return facts


def test_100k_views_under_a_1024_descriptor_limit(key, tmp_path):
    a = shmarray.share(key, np.arange(1024.0))
    data = pickle.dumps(a[10:20])
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    child = start(_hold_many_views, key, data, 100_000, 1024, ready, go)
    try:
        wait_for(ready, timeout=120)
        assert a[10] == 123.0  # written through the child's last unpickled view
        # The child holds one attachment: its users are its 100,000 views.
        assert shmarray.segment_info(key).attachments == 2
        a[11] = 7.0
        with open(go, "w"):
            pass
        facts = child.result(timeout=120)
    finally:
        child.close()
    assert facts["all_same"]
    assert facts["fds"] <= 2 and facts["maps"] == 1, facts
    assert facts["seen_back"] == 7.0
    # The last view gone: the child detached (no descriptor, no mapping of it left).
    assert facts["fds_after"] == 0 and facts["maps_after"] == 0, facts


def test_one_attachment_serves_every_user_in_a_process(key):
    a = shmarray.share(key, np.arange(100.0))
    before_fds, before_maps = _fds_of(key), _maps_of(key)
    assert before_fds <= 2 and before_maps == 1
    b = shmarray.attach(key)
    views = [pickle.loads(pickle.dumps(a[i : i + 5])) for i in range(50)]
    seg = shmarray.Segment(key).attach()
    assert (_fds_of(key), _maps_of(key)) == (before_fds, before_maps)
    assert shmarray.segment_info(key).attachments == 1
    views[7][0] = -1.0
    start = a.__array_interface__["data"][0] - np.frombuffer(seg.data, np.uint8).__array_interface__["data"][0]
    assert a[7] == -1.0 and b[7] == -1.0
    assert bytes(seg.data[start + 56 : start + 64]) == struct.pack("<d", -1.0)
    # ReadOnly is a second attachment: its mapping cannot be written.
    r = shmarray.attach(key, readonly=True)
    assert _maps_of(key) == 2 and _fds_of(key) <= 4
    assert not r.flags.writeable
    with pytest.raises(ValueError):
        r.flags.writeable = True
    del r
    gc.collect()
    assert _maps_of(key) == 1


def test_the_process_detaches_when_its_last_user_goes(key):
    a = shmarray.create(key, 10, persistent=True)
    ino = _inode(key)
    fds = _fds_of(key)
    b = shmarray.attach(key)
    v = pickle.loads(pickle.dumps(a[2:]))
    a.close()
    b.close()
    assert _fds_of(key) == fds  # v still uses the attachment
    v[0] = 5.0
    del v, a, b  # closed arrays still map the memory (views outlive close())
    gc.collect()
    assert _fds_of(key, ino) == 0 and _maps_of(key, ino) == 0
    assert shmarray.segment_info(key).attachments == 0
    shmarray.unlink(key)


def _view_and_report(data: bytes, ready: str, go: str) -> float:
    v = pickle.loads(data)
    with open(ready, "w"):
        pass
    wait_for(go)
    value = float(v[0])
    del v
    return value


def test_the_last_detach_anywhere_still_destroys(key, tmp_path):
    a = shmarray.share(key, np.full(8, 3.0))
    data = pickle.dumps(a[1:])
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    child = start(_view_and_report, data, ready, go)
    try:
        wait_for(ready)
        del a
        gc.collect()
        assert os.path.exists(f"/dev/shm/{native_key_for(key)}")  # the child's view holds it
        with open(go, "w"):
            pass
        assert child.result() == 3.0
    finally:
        child.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/dev/shm/{native_key_for(key)}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/dev/shm/{native_key_for(key)}")


# -- the lock stays per object ----------------------------------------------------------------------


def test_two_roots_exclude_each_other_across_threads(key):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    got: list[bool] = []
    with a.lock():
        t = threading.Thread(target=lambda: got.append(b.segment.lock(timeout=0.2)))
        t.start()
        t.join(10)
        assert got == [False]
        assert b.segment.lock(timeout=0) is False  # in this thread too
        assert b.segment.lock(timeout=0, shared=True) is False
    order: list[str] = []

    def holder() -> None:
        with b.lock():
            order.append("b in")
            time.sleep(0.2)
            order.append("b out")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        time.sleep(0.005)
    with a.lock():
        order.append("a in")
    t.join(10)
    assert order == ["b in", "b out", "a in"]


def test_readers_share_writers_wait(key):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    c = shmarray.attach(key)
    assert a.segment.lock(shared=True) and b.segment.lock(shared=True)
    assert c.segment.lock(timeout=0.05) is False
    a.segment.unlock()
    assert c.segment.lock(timeout=0.05) is False
    b.segment.unlock()
    assert c.segment.lock(timeout=1)
    assert a.segment.lock(timeout=0, shared=True) is False
    c.segment.unlock()


def test_views_share_their_roots_lock_and_one_close_leaves_the_other(key):
    a = shmarray.create(key, 8)
    b = shmarray.attach(key)
    v = a[2:]
    with a.lock():
        assert v.segment.lock_held == "exclusive"
        assert b.segment.lock(timeout=0) is False
    a.close()
    b[0] = 4.0
    with b.lock():
        b[1] = 5.0
    assert b.segment.is_attached and list(b[:2]) == [4.0, 5.0]
    assert v[0] == 0.0  # a view outlives its root's close()


def test_locks_exclude_across_processes_through_a_shared_attachment(key, tmp_path):
    a = shmarray.create(key, 4)
    b = shmarray.attach(key)
    assert b.segment.lock()
    assert run(_try_lock, key) is False
    b.segment.unlock()
    assert run(_try_lock, key) is True
    del a


def _try_lock(key: str) -> bool:
    return shmarray.attach(key).segment.lock(timeout=0.1)


# -- references name the segment instance -----------------------------------------------------------


def _unpickle(data: bytes) -> float:
    return float(np.asarray(pickle.loads(data)).sum())


def test_a_replaced_segment_is_refused_in_a_fresh_process(key):
    a = shmarray.share(key, np.array([1.0, 2.0, 3.0, 4.0]))
    data = pickle.dumps(a)
    a.close()
    del a
    gc.collect()
    b = shmarray.share(key, np.array([10.0, 20.0, 30.0, 10.0]))  # same key, same shape
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced") as err:
        run(_unpickle, data)
    assert key in str(err.value)
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced"):
        pickle.loads(data)
    assert run(_unpickle, pickle.dumps(b)) == 70.0


def test_a_process_that_holds_the_old_instance_gets_it(key):
    a = shmarray.share(key, np.array([1.0, 2.0, 3.0, 4.0]))
    data = pickle.dumps(a[:])
    shmarray.unlink(key)
    b = shmarray.share(key, np.array([10.0, 20.0, 30.0, 10.0]))
    old = pickle.loads(data)
    assert float(old.sum()) == 10.0 and float(b.sum()) == 70.0
    old[0] = 100.0
    assert a[0] == 100.0 and b[0] == 10.0
    # Held in another mode: the same instance, opened again from what is held.
    ro = pickle.loads(pickle.dumps(np.asarray(a)))  # a plain view of the old instance goes by value
    assert type(ro) is np.ndarray and ro.tolist() == [100.0, 2.0, 3.0, 4.0]
    a.flags.writeable = False
    old_ro = pickle.loads(pickle.dumps(a))
    assert not old_ro.flags.writeable and float(old_ro.sum()) == 109.0


def test_segment_pickles_name_the_instance(key):
    seg = shmarray.Segment(key).create(16)
    data = pickle.dumps(seg)
    seg2 = pickle.loads(data)
    assert seg2.is_attached and seg2.size == 16 and seg2 is not seg
    seg.detach()
    seg2.detach()
    shmarray.Segment(key).create(16).unlink()
    other = shmarray.Segment(key).create(16)
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced"):
        pickle.loads(data)
    other.detach()


def test_ring_references_name_the_instance(key):
    ring = shmarray.BatchRing.create(key, {"x": ((2,), "f4")}, slots=2)
    data = pickle.dumps(ring)
    again = pickle.loads(data)
    assert again.key == key
    again.close()
    ring.close()
    ring2 = shmarray.BatchRing.create(key, {"x": ((2,), "f4")}, slots=2)
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced"):
        pickle.loads(data)
    ring2.close()


def test_a_reference_from_another_host_says_so(key):
    a = shmarray.share(key, np.arange(3.0))
    fn, args = a[1:].__reduce_ex__(5)
    ref, detail = args  # Reference: key, native, mode, host, incarnation, dir
    args = ((*ref[:3], ref[3] ^ 0xFFFF, *ref[4:]), detail)
    with pytest.raises(shmarray.ShmError, match="another host") as err:
        fn(*args)
    assert not isinstance(err.value, shmarray.NotFoundError)


_OTHER_SHM = r"""
import pickle, sys
import shmarray
data = bytes.fromhex(sys.argv[1] if len(sys.argv) > 1 else open("/tmp/__ref").read())
try:
    pickle.loads(data)
except shmarray.ShmError as e:
    print("refused:", e)
else:
    print("attached!")
"""


def test_a_reference_in_another_dev_shm_is_refused(key, tmp_path):
    """A process with its own /dev/shm (another container, a simulated host) that holds the same key."""
    a = shmarray.share(key, np.arange(4.0))
    ref = pickle.dumps(a).hex()
    script = (f"import shmarray, numpy as np\n"
              f"decoy = shmarray.share({key!r}, np.full(4, 9.0))\n"  # the same key over there
              + _OTHER_SHM.replace('sys.argv[1] if len(sys.argv) > 1 else open("/tmp/__ref").read()',
                                   repr(ref)))
    out = run_with_small_dev_shm(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "another host" in out.stdout, out.stdout


# -- fork ---------------------------------------------------------------------------------------------


def _in_forked_child(data: bytes, key: str) -> tuple[float, float, int]:
    import __main__  # noqa: F401 - runs in a fork of the test process

    v = pickle.loads(data)
    v[0] = 11.0
    return float(v[1]), float(v[0]), _fds_of(key)


def test_fork_with_inherited_views(key):
    a = shmarray.share(key, np.arange(6.0))
    view = a[2:]
    data = pickle.dumps(view)
    got = run(_fork_child_body, key, data, method="fork")
    assert got[0] == 3.0 and got[1] == 11.0
    assert got[2] <= 3  # the child's own description of the inherited attachment, plus its mapping's
    assert a[2] == 11.0
    assert view[1] == 3.0
    assert shmarray.segment_info(key).attachments == 1


def _fork_child_body(key: str, data: bytes) -> tuple[float, float, int]:
    return _in_forked_child(data, key)


# -- limits ---------------------------------------------------------------------------------------------


def _exhaust_descriptors(prefix: str) -> str:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:
        for i in range(100):
            held.append(shmarray.create(f"{prefix}-{i}", 8))
    except shmarray.OutOfResourcesError as e:
        return str(e)
    finally:
        for h in held:
            h.close()
    return "no error"


def test_running_out_of_descriptors_names_the_limit(key):
    msg = run(_exhaust_descriptors, key)
    assert "RLIMIT_NOFILE" in msg and "64" in msg and "ulimit -n" in msg and "setrlimit" in msg, msg
    assert "/dev/shm has" not in msg


# -- the control block -------------------------------------------------------------------------------


def _v1_segment(key: str, payload: bytes) -> None:
    """A segment as shmarray wrote them before incarnations (control block version 1)."""
    page = backend.PAGE_SIZE
    raw_key = key.encode()
    head = struct.pack("<8sIIQQQIIdII", b"SHMARRAY", 1, 1, len(payload), page, 0, 0, os.getpid(),
                       time.time(), len(raw_key), 0) + raw_key
    path = f"/dev/shm/{native_key_for(key)}"
    with open(path, "wb") as f:
        f.write(head + bytes(page - len(head)) + payload)
    os.chmod(path, 0o600)


def test_a_version_1_segment_still_attaches(key):
    _v1_segment(key, b"hello")
    seg = shmarray.Segment(key).attach()
    assert bytes(seg.data) == b"hello" and seg.persistent
    assert shmarray.segment_info(key).key == key
    data = pickle.dumps(seg)
    seg.detach()
    again = pickle.loads(data)  # no incarnation: by key, as before
    assert bytes(again.data) == b"hello"
    again.detach()
    shmarray.unlink(key)


def test_a_newer_control_block_is_a_clear_error(key):
    _v1_segment(key, b"x")
    path = f"/dev/shm/{native_key_for(key)}"
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 3))
    with pytest.raises(shmarray.UnknownShmError, match="version 3.*newer shmarray"):
        shmarray.Segment(key).attach()
    shmarray.unlink(key)


def test_incarnations_differ_and_are_in_the_control_block(key):
    from shmarray._control import ControlBlock

    def incarnation() -> int:
        with open(f"/dev/shm/{native_key_for(key)}", "rb") as f:
            return ControlBlock(f.read(4096)).incarnation

    a = shmarray.create(key, 4)
    first = incarnation()
    a.close()
    b = shmarray.create(key, 4)
    assert first and incarnation() and incarnation() != first
    b.close()


def test_every_picklable_kind_carries_one_reference(make_key):
    """Arrays and views, table handles, segments, rings and slot tokens: one Reference, one rebuild path."""
    from shmarray._reference import Reference, rebuild

    pa = pytest.importorskip("pyarrow")
    a = shmarray.share(make_key(), np.arange(6.0))
    t = shmarray.share_table(make_key(), pa.table({"x": [1, 2]}))
    seg = shmarray.Segment(make_key()).create(64)
    ring = shmarray.BatchRing.create(make_key(), {"x": ((2,), np.int64)}, 2)
    try:
        handle = shmarray.table_handle(t)
        for obj, mode in ((a, 1), (a[::2], 1), (handle, 0), (seg, 1), (ring, 1)):
            entry, (fields, _detail) = obj.__reduce_ex__(5)
            ref = Reference(*fields)
            assert ref.mode == mode and ref.incarnation and ref.host, (obj, ref)
            assert rebuild.__wrapped__.__code__ in {c.f_code for c in _frames_of(entry, fields, _detail)}
        token = ring.acquire(0).handoff()
        assert isinstance(token.ring, Reference) and token.ring.incarnation == Reference(
            *ring.__reduce_ex__(5)[1][0]).incarnation
        ring.claim(token).release()
    finally:
        ring.close()
        seg.detach()


def _frames_of(entry, fields, detail):  # noqa: ANN001, ANN202 - the frames a rebuild runs through
    import sys

    seen = []

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202
        if event == "call":
            seen.append(frame)
        return None

    sys.setprofile(tracer)
    try:
        obj = entry(fields, detail)
    finally:
        sys.setprofile(None)
    if hasattr(obj, "close"):
        obj.close()
    return seen


def test_a_slot_token_of_a_replaced_ring_is_stale(key):
    fields = {"x": ((2,), np.int64)}
    ring = shmarray.BatchRing.create(key, fields, 2)
    token = ring.acquire(0).handoff()
    ring.close()  # the last holder: the ring goes, and another takes its key
    with shmarray.BatchRing.create(key, fields, 2) as again:
        again.acquire(0).handoff()  # the same slot, generation and ticket as the token's
        with pytest.raises(shmarray.SlotLostError, match="another ring"):
            again.claim(token)
