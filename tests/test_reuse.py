"""Warm memory (issue 12): recycled pages and kept mappings, with every old rule still true.

Recycling is judged by the file: a segment built in recycled memory has the
inode of the segment it replaced. Memory is judged by what the kernel says
(statvfs of /dev/shm, the names in it), only for this test's own files.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import shmarray
from shmarray._reuse import idle_maps, kept_files
from shmarray._os import native_key_for

from _procs import run, run_with_small_dev_shm, start, wait_for
from conftest import SHM

MiB = 1 << 20


def _ino(key: str) -> int:
    return os.stat(os.path.join(SHM, native_key_for(key))).st_ino


def _kept_of(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"{kept_files.KEEP_PREFIX}{pid}-"))


@pytest.fixture(autouse=True)
def _reuse_on():
    idle_maps.set_budget(1 << 30)
    yield
    gc.collect()
    kept_files.release_all()
    idle_maps.set_budget(None)


@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.int32, np.complex128, "U3",
                                   [("a", "i4"), ("b", "f8")]])
@pytest.mark.parametrize("nbytes", [1 * MiB + 123, 4 * MiB, 9 * MiB + 7])
def test_create_after_reuse_is_zero_filled(make_key, dtype, nbytes):
    dt = np.dtype(dtype)
    count = nbytes // dt.itemsize
    k1, k2 = make_key(), make_key()
    junk = np.frombuffer(np.random.default_rng(1).bytes(count * dt.itemsize), np.uint8)
    a = shmarray.share(k1, junk)
    old = _ino(k1)
    del a
    b = shmarray.create(k2, (count,), dt)
    assert _ino(k2) == old, "the second segment should be built in the first one's file"
    assert not np.asarray(b).view(np.uint8).any()
    # The whole user area, header padding and tail included, holds nothing of the old bytes.
    data = b.segment.const_data
    assert data is not None and len(data) == b.segment.size
    hdr_end = len(data) - b.nbytes
    assert not bytes(data[hdr_end:]).strip(b"\0")


def test_fill_value_after_reuse(make_key):
    k1, k2 = make_key(), make_key()
    a = shmarray.share(k1, np.full(2 * MiB, 7, np.uint8))
    old = _ino(k1)
    del a
    b = shmarray.create(k2, (MiB // 4,), np.float64, fill=2.5)
    assert _ino(k2) == old
    assert (np.asarray(b) == 2.5).all()


def test_smaller_array_after_bigger_reads_exactly_itself(make_key):
    k1, k2 = make_key(), make_key()
    big = shmarray.share(k1, np.ones(1 << 20))        # 8 MiB of 1.0
    old = _ino(k1)
    del big
    small_src = np.full(600_000, 2.0)                 # 4.6 MiB: more than half the file
    small = shmarray.share(k2, small_src)
    assert _ino(k2) == old
    assert small.shape == (600_000,) and float(small.sum()) == 1_200_000.0
    seg = small.segment
    assert seg.size < 8 * MiB
    # A second process sees the same: its size, its bytes, nothing past them.
    assert run(_attach_sum, k2) == (600_000, 1_200_000.0)
    listed = [e for e in shmarray.ls() if e.key == k2]
    assert listed and listed[0].size == seg.size


def _attach_sum(key: str) -> tuple[int, float]:
    a = shmarray.attach(key)
    return a.size, float(a.sum())


def test_table_after_array_reuse(make_key):
    pa = pytest.importorskip("pyarrow")
    k1, k2 = make_key(), make_key()
    a = shmarray.share(k1, np.full(1 << 19, 9.0))
    del a
    t = pa.table({"x": np.arange(300_000), "s": [str(i % 7) for i in range(300_000)]})
    shared = shmarray.share_table(k2, t)
    assert shared.equals(t)
    assert run(_table_rows, k2) == 300_000
    del shared


def _table_rows(key: str) -> int:
    return shmarray.attach_table(key).num_rows


def test_a_view_that_outlives_close_is_never_recycled(make_key):
    k1, k2 = make_key(), make_key()
    a = shmarray.share(k1, np.ones(1 << 20))
    old = _ino(k1)
    view = a[10:20]
    a.close()
    del a  # the segment is destroyed, but `view` still maps its pages
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach(k1)
    b = shmarray.share(k2, np.full(1 << 20, 5.0))
    assert _ino(k2) != old
    assert (view == 1.0).all() and (np.asarray(b) == 5.0).all()


def test_a_worker_sees_the_new_array_through_its_kept_mapping(make_key):
    """A worker keeps its idle mapping; the next array recycles the file: the worker reads the new bytes."""
    keys = [make_key() for _ in range(4)]
    child = start(_worker_loop, keys)
    inos = []
    try:
        for i, k in enumerate(keys):
            a = shmarray.share(k, np.full(1 << 20, float(i + 1)))
            inos.append(_ino(k))
            with open(f"/tmp/shmarray-test-go-{keys[0]}-{i}", "w"):
                pass
            wait_for(f"/tmp/shmarray-test-done-{keys[0]}-{i}")
            del a
        got = child.result(30)
    finally:
        for i in range(len(keys)):
            for what in ("go", "done"):
                try:
                    os.unlink(f"/tmp/shmarray-test-{what}-{keys[0]}-{i}")
                except FileNotFoundError:
                    pass
    assert [s for s, _ in got] == [float(i + 1) * (1 << 20) for i in range(4)]
    assert len(set(inos)) < len(inos), "the producer should recycle its files"
    assert any(warm for _, warm in got[1:]), "the worker should reuse its kept mapping"


def _worker_loop(keys: list[str]) -> list[tuple[float, bool]]:
    out = []
    for i, k in enumerate(keys):
        wait_for(f"/tmp/shmarray-test-go-{keys[0]}-{i}")
        a = shmarray.attach(k)
        warm = bool(a.segment._att.region.warm)
        out.append((float(a.sum()), warm))
        del a
        with open(f"/tmp/shmarray-test-done-{keys[0]}-{i}", "w"):
            pass
    return out


def test_kept_memory_is_hidden_from_ls_and_shown_by_ls_all(make_key):
    k = make_key()
    a = shmarray.share(k, np.ones(1 << 18))
    del a
    kept = _kept_of(os.getpid())
    assert any("." in n[len(kept_files.KEEP_PREFIX):] for n in kept)
    assert all(e.key != k for e in shmarray.ls())
    assert not any(e.native_key.startswith(kept_files.KEEP_PREFIX) for e in shmarray.ls())
    every = shmarray.ls(include_foreign=True)
    mine = [e for e in every if e.kind == "kept" and e.creator_pid == os.getpid()]
    assert mine and all("kept for reuse" in e.payload for e in mine)
    out = subprocess.run([sys.executable, "-m", "shmarray", "ls", "--all", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["kind"] == "kept" and r["creator_pid"] == os.getpid()]
    assert rows and rows[0]["size"] >= 2 * MiB


def test_a_key_spelled_like_a_kept_name_does_not_touch_kept_memory(make_key):
    k = make_key()
    a = shmarray.share(k, np.ones(1 << 18))
    del a
    kept = [n for n in _kept_of(os.getpid()) if "." in n[len(kept_files.KEEP_PREFIX):]]
    assert kept
    inos = {n: os.stat(os.path.join(SHM, n)).st_ino for n in kept}
    for name in kept:
        with pytest.raises(shmarray.NotFoundError):
            shmarray.attach(name)  # a key, not a kept file
        b = shmarray.create(name, 8)  # its own segment, under its own native name
        assert b.segment.native_key != name and (np.asarray(b) == 0).all()
        b.close()
        del b
    assert {n: os.stat(os.path.join(SHM, n)).st_ino for n in kept} == inos


# -- the budget ------------------------------------------------------------------------

_BUDGET = """
import gc, json, os, sys
import numpy as np, shmarray
D = os.environ.get("SHMARRAY_DIR") or "/dev/shm"  # the small mount is made there
def used():
    st = os.statvfs(D)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
def kept():
    return sorted(n for n in os.listdir(D) if n.startswith(".shmarray-keep-%d-" % os.getpid()))
base = used()
out = {}
for mb in (2, 8):
    a = shmarray.share("budget-%d-%d" % (os.getpid(), mb), np.ones(mb * 131072))
    del a
    gc.collect()
    out[mb] = (used() - base, len(kept()))
print(json.dumps(out))
"""


@pytest.mark.parametrize("budget, expect", [("0", {"2": 0, "8": 0}), ("3M", {"2": 1, "8": 1}),
                                            ("1G", {"2": 1, "8": 2})])
def test_budget(budget, expect, tmp_path):
    """0: nothing kept, df unchanged; 3M: the 2 MiB array is kept, the 8 MiB one is not; 1G: both."""
    out = run_with_small_dev_shm(_BUDGET, tmp_path, size="256m", env={"SHMARRAY_REUSE_BYTES": budget})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    for mb, n_kept_names in expect.items():
        grew, names = got[mb]
        files = max(0, names - 1)  # the owner file is empty
        assert files == n_kept_names, (budget, got)
        if n_kept_names == 0:
            assert grew < MiB, (budget, got)
    if budget == "3M":
        assert got["8"][0] < 3 * MiB, got  # the big one went back at once
    if budget == "1G":
        assert got["8"][0] >= 10 * MiB, got


def test_bad_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="SHMARRAY_REUSE_BYTES"):
        idle_maps.parse_bytes("lots")
    assert idle_maps.parse_bytes("512M") == 512 * MiB and idle_maps.parse_bytes("1.5GiB") == 3 << 29
    assert idle_maps.parse_bytes("0") == 0 and idle_maps.parse_bytes("4096") == 4096


# -- nothing left ----------------------------------------------------------------------

_EXIT = """
import os, sys, numpy as np, shmarray
for i in range(3):
    a = shmarray.share("exit-%d-%d" % (os.getpid(), i), np.ones(4 << 20))
    del a
keep = shmarray.share("exit-alive-%d" % os.getpid(), np.ones(1 << 20))
print(os.getpid(), flush=True)
if sys.argv[1:] == ["hang"]:
    import time
    time.sleep(60)
"""


@pytest.mark.parametrize("next_step", ["ls", "create", "gc"])
def test_after_sigkill_the_next_process_frees_kept_memory(tmp_path, make_key, next_step, unwatched):
    script = tmp_path / "exit.py"
    script.write_text(_EXIT)
    proc = subprocess.Popen([sys.executable, str(script), "hang"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SHMARRAY_REUSE_BYTES": "1G"})
    try:
        pid = int(proc.stdout.readline())
        assert len(_kept_of(pid)) >= 2  # the owner and at least one kept file
        os.kill(pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    # Until gc (or a create) frees it, `ls --all` shows what it left.
    listed = [e for e in shmarray.ls(include_foreign=True) if e.kind == "kept" and e.creator_pid == pid]
    assert listed and all("owner gone" in e.payload for e in listed)
    if next_step == "ls":
        # A listing frees nothing: it shows the dead owner's memory as an orphan, and gc frees it.
        run(_ls_only)
        assert _kept_of(pid)
        assert [e for e in shmarray.ls() if e.kind == "kept" and e.creator_pid == pid and e.orphan]
        shmarray.collect_garbage()
    elif next_step == "create":
        run(_create_one, make_key())
    else:
        out = subprocess.run([sys.executable, "-m", "shmarray", "gc"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
    assert _kept_of(pid) == []
    # Its alive segment is an orphan now: attach (or gc) reaps it as before.
    alive = f"exit-alive-{pid}"
    if next_step == "create":
        with pytest.raises(shmarray.NotFoundError):
            shmarray.attach(alive)
    assert not os.path.exists(os.path.join(SHM, native_key_for(alive)))
    assert not [n for n in os.listdir(SHM) if f"-{pid}-" in n]


def _ls_only() -> int:
    return len(shmarray.ls())


def _create_one(key: str) -> None:
    a = shmarray.create(key, 16)
    a.close()


# -- a full /dev/shm -------------------------------------------------------------------

_FULL = """
import os, numpy as np, shmarray
D = os.environ.get("SHMARRAY_DIR") or "/dev/shm"  # the small mount is made there
a = shmarray.share("full-a", np.ones(30 << 17))     # 30 MiB, kept once dropped
del a
print("kept:", sorted(n for n in os.listdir(D) if n.startswith(".shmarray-keep-")))
b = shmarray.share("full-b", np.ones(45 << 17))     # 45 MiB: fits only once the kept 30 MiB is given back
print("b:", float(b.sum()) == 45 << 17)
del b
try:
    shmarray.create("full-c", 70 << 20, np.uint8)
except shmarray.OutOfResourcesError as e:
    print("c: out of resources:", "free" in str(e))
print("left:", sorted(n for n in os.listdir(D) if not n.startswith(".shmarray-keep-")))
"""


def test_full_dev_shm_gives_kept_memory_back(tmp_path):
    out = run_with_small_dev_shm(_FULL, tmp_path, size="64m", env={"SHMARRAY_REUSE_BYTES": "1G"})
    assert out.returncode == 0, out.stderr  # a SIGBUS would be -7
    assert "kept: ['.shmarray-keep-" in out.stdout, out.stdout
    assert "b: True" in out.stdout, out.stdout
    assert "c: out of resources: True" in out.stdout, out.stdout
    assert "left: []" in out.stdout, out.stdout


# -- fork ------------------------------------------------------------------------------

def test_fork_child_does_not_take_the_parents_kept_memory(make_key):
    k1, k2 = make_key(), make_key()
    a = shmarray.share(k1, np.ones(1 << 18))
    del a
    kept_before = _kept_of(os.getpid())
    res = run(_share_in_child, k2, method="fork")
    assert res == 5.0 * (1 << 18)
    assert _kept_of(os.getpid()) == kept_before


def _share_in_child(key: str) -> float:
    b = shmarray.share(key, np.full(1 << 18, 5.0))
    s = float(b.sum())
    del b
    kept_files.release_all()
    return s


def test_a_forked_childs_inherited_view_is_never_recycled(make_key):
    """The parent drops its array right after fork() and shares another: the child's view keeps its bytes."""
    k1, k2 = make_key(), make_key()
    a = shmarray.share(k1, np.full(1 << 20, 3.0))
    view = a[::2]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait until the parent has tried to recycle, then read
        code = 1
        try:
            os.close(w)
            os.read(r, 1)
            code = 0 if float(view.sum()) == 3.0 * (1 << 19) else 2
        finally:
            os._exit(code)
    os.close(r)
    del view, a
    gc.collect()
    b = shmarray.share(k2, np.full(1 << 20, 7.0))
    os.write(w, b"x")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert float(b.sum()) == 7.0 * (1 << 20)
