"""shmarray.allocating(): NumPy's data in shared memory (NEP 49), and share() of it without a copy."""

from __future__ import annotations

import gc
import importlib
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import shmarray
from _procs import run, run_with_small_dev_shm, start, wait_for
from shmarray._reuse import allocator

MIB = 1 << 20
SHM = os.environ.get("SHMARRAY_DIR") or "/dev/shm"


def handler_name(a: np.ndarray) -> str:
    try:
        mod = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1.x
        mod = importlib.import_module("numpy.core.multiarray")
    return str(mod.get_handler_name(a))


def in_shared(a: np.ndarray) -> bool:
    return allocator.holds(a)


def names() -> set[str]:
    return set(os.listdir(SHM))


def test_big_arrays_in_shared_memory_small_ones_not() -> None:
    before = names()
    with shmarray.allocating(min_bytes=MIB):
        big = np.zeros(MIB // 8)
        small = np.ones(1000)
        assert handler_name(big) == "shmarray"
    assert in_shared(big) and not in_shared(small)
    assert big.sum() == 0 and small.sum() == 1000
    assert names() == before  # an allocation has no name in the directory
    after = np.zeros(MIB // 8)
    assert not in_shared(after) and handler_name(after) != "shmarray"


def test_many_small_arrays_never_reach_shared_memory() -> None:
    with shmarray.allocating():
        arrays = [np.arange(i % 1000) * 2.0 for i in range(20_000)]
    assert not any(in_shared(a) for a in arrays)
    assert arrays[999][3] == 6.0


@pytest.mark.parametrize("shape,dtype", [((3000, 100), np.float64), ((MIB + 3,), np.uint8),
                                         ((70_001,), np.dtype([("a", "<i4"), ("b", "<f8")]))])
def test_alignment(shape: tuple[int, ...], dtype: Any) -> None:
    with shmarray.allocating(min_bytes=4096):
        a = np.empty(shape, dtype)
    assert in_shared(a)
    assert a.ctypes.data % 64 == 0
    assert a.ctypes.data % 4096 == 0


def test_calloc_is_zero_also_when_memory_is_recycled() -> None:
    with shmarray.allocating():
        a = np.empty(4 * MIB // 8)
        a[:] = 7.0
        addr = a.ctypes.data
        del a
        b = np.zeros(4 * MIB // 8)  # the same file, taken back from the pool
    assert b.ctypes.data == addr
    assert not b.any()


def test_share_copies_nothing_and_both_see_the_same_bytes(key: str) -> None:
    with shmarray.allocating():
        a = np.arange(2 * MIB // 8, dtype=np.float64)
    s = shmarray.share(key, a)
    assert allocator.block_for(a, None) is None  # published: its file is the segment now
    a[5] = -1.0
    assert s[5] == -1.0
    s[6] = -2.0
    assert a[6] == -2.0
    b = shmarray.attach(key)
    assert b[5] == -1.0 and b.shape == a.shape and b.dtype == a.dtype
    again = shmarray.share(key + "x", a)  # a second share copies
    a[7] = -3.0
    assert again[7] == 7.0
    again.close()
    del again


def _attach_wait_sum(key: str, ready: str, go: str) -> float:
    import shmarray

    b = shmarray.attach(key)
    open(ready, "w").close()
    wait_for(go)
    return float(b.sum())


def test_producer_dropping_the_array_leaves_the_segment_to_its_attachers(key: str, tmp_path: Any) -> None:
    with shmarray.allocating():
        a = np.ones(2 * MIB // 8)
    s = shmarray.share(key, a)
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    child = start(_attach_wait_sum, key, ready, go)
    try:
        wait_for(ready)
        del a, s
        gc.collect()
        with shmarray.allocating():  # may recycle: never the file the child still holds
            c = np.zeros(2 * MIB // 8)
            c[:] = 5.0
        open(go, "w").close()
        assert child.result(30) == 2 * MIB // 8
    finally:
        child.close()
    del c


def test_views_slices_and_orders(make_key: Any) -> None:
    with shmarray.allocating():
        a = np.arange(MIB // 8 * 2, dtype=np.float64).reshape(2048, 128)
    # A view of exactly the allocation (other shape, Fortran order) is published in place.
    t = shmarray.share(make_key(), a.T)
    assert t.flags.f_contiguous and np.array_equal(t, a.T)
    a[0, 1] = -1
    assert t[1, 0] == -1
    # Part of it, or a strided view, is copied.
    part = shmarray.share(make_key(), a[10:20])
    strided = shmarray.share(make_key(), a[:, ::2])
    assert np.array_equal(strided, a[:, ::2])
    a[10, 0] = -5
    assert part[0, 0] == 10 * 128 and strided[10, 0] == 10 * 128
    v = a[100:200]
    assert np.shares_memory(v, a) and v[0, 0] == 100 * 128
    for x in (t, part, strided):
        x.close()


def test_realloc_paths_keep_the_values() -> None:
    with shmarray.allocating(min_bytes=64 * 1024):
        a = np.arange(100_000, dtype=np.float64)  # big
        a.resize(200_000, refcheck=False)  # grows past the file: a new one, bytes copied
        assert np.array_equal(a[:100_000], np.arange(100_000)) and in_shared(a)
        a.resize(90_000, refcheck=False)  # shrinks in place
        assert np.array_equal(a, np.arange(90_000)) and in_shared(a)
        small = np.arange(100, dtype=np.float64)
        small.resize(50_000, refcheck=False)  # small -> big
        assert np.array_equal(small[:100], np.arange(100)) and in_shared(small)
        a.resize(100, refcheck=False)  # big -> small stays where it is
        assert np.array_equal(a, np.arange(100))
        grown = np.fromiter((float(i) for i in range(300_000)), dtype=np.float64)  # grows by realloc
        assert grown[-1] == 299_999.0


def test_save_and_load(tmp_path: Any) -> None:
    with shmarray.allocating():
        a = np.random.default_rng(1).random((512, 512))
        buf = io.BytesIO()
        np.save(buf, a)
        buf.seek(0)
        b = np.load(buf)
        np.save(tmp_path / "a.npy", a)
        c = np.load(tmp_path / "a.npy")
    assert in_shared(a) and in_shared(b) and in_shared(c)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_pickling_stays_by_value() -> None:
    with shmarray.allocating():
        a = np.arange(MIB // 8, dtype=np.int64)
    b = pickle.loads(pickle.dumps(a))
    assert type(b) is np.ndarray and np.array_equal(a, b)
    b[0] = 99
    assert a[0] == 0


def test_arrays_outlive_the_block_and_come_back_for_reuse() -> None:
    with shmarray.allocating():
        a = np.full(MIB // 8, 3.0)
    b = a * 2  # after the block: default allocator
    assert not in_shared(b) and a.sum() == 3.0 * (MIB // 8)
    pooled = len(allocator._pool)
    del a
    assert len(allocator._pool) >= min(pooled + 1, 1)


def test_exception_restores_the_previous_allocator() -> None:
    with pytest.raises(ZeroDivisionError):
        with shmarray.allocating():
            x = np.zeros(MIB // 8)
            1 / 0
    assert in_shared(x)
    assert handler_name(np.zeros(MIB // 8)) != "shmarray"


def test_nested_blocks() -> None:
    with shmarray.allocating(min_bytes=4 * MIB):
        outer = np.zeros(MIB // 8)
        with shmarray.allocating(min_bytes=64 * 1024):
            inner = np.zeros(MIB // 8)
        back = np.zeros(MIB // 8)
        big = np.zeros(4 * MIB // 8)
    assert not in_shared(outer) and in_shared(inner) and not in_shared(back) and in_shared(big)
    assert handler_name(np.zeros(10)) != "shmarray"


def test_threads_outside_the_block_are_unaffected_and_threads_inside_are_safe() -> None:
    seen: dict[str, bool] = {}

    def outside() -> None:
        seen["outside"] = in_shared(np.zeros(MIB // 8))

    errors: list[BaseException] = []

    def churn(n: int) -> None:
        try:
            with shmarray.allocating(min_bytes=64 * 1024):
                for i in range(60):
                    x = np.full(20_000 + 1000 * ((i + n) % 7), float(n))
                    y = np.ones(10)
                    assert in_shared(x) and not in_shared(y) and x[-1] == n
                    del x
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with shmarray.allocating():
        t = threading.Thread(target=outside)
        t.start()
        t.join(30)
        workers = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
    assert seen == {"outside": False}
    assert not errors, errors


def _fork_and_write(a: np.ndarray, inside: bool) -> int:
    """Fork; the child writes its copy of *a* and allocates (in a block when *inside*); the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            a[:] = -1.0
            if inside:
                b = np.zeros(2 * MIB // 8)
                b[:] = 2.0
                code = 0 if in_shared(b) and b.sum() == 2.0 * (2 * MIB // 8) else 2
                del b
            else:
                code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError("forked child hung")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (pytest-timeout's)
def test_fork_inside_and_after_the_block(key: str) -> None:
    with shmarray.allocating():
        a = np.ones(2 * MIB // 8)
        assert _fork_and_write(a, True) == 0
    assert a.min() == 1.0  # the child's writes stayed in the child
    s = shmarray.share(key, a)
    assert _fork_and_write(a, False) == 0
    assert a.min() == 1.0 and s.min() == 1.0
    del s


def _allocate_share_and_exit(key: str) -> int:
    import numpy as np

    import shmarray

    with shmarray.allocating():
        a = np.ones(4 * (1 << 20) // 8)
        b = np.zeros(2 * (1 << 20) // 8)
    s = shmarray.share(key, a)
    del b
    return int(s.sum())


def test_nothing_left_in_the_directory_after_exit(key: str) -> None:
    before = names()
    free_before = os.statvfs(SHM).f_bavail
    assert run(_allocate_share_and_exit, key, timeout=60) == 4 * MIB // 8
    gc.collect()
    assert names() - before == set()
    # The memory is back (within a margin for other users of the directory).
    assert os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize >= free_before * os.statvfs(SHM).f_frsize - MIB


_FULL = """
import numpy as np, shmarray, signal
with shmarray.allocating():
    small = np.ones(1 << 20)  # 8 MiB fits
    try:
        big = np.zeros(128 << 20)  # 1 GiB does not fit a 64 MiB directory
    except shmarray.OutOfResourcesError as e:
        print("inside", type(e).__name__)
    except MemoryError as e:
        print("inside MemoryError")
try:
    with shmarray.allocating():
        big = np.empty(128 << 20)
except shmarray.OutOfResourcesError as e:
    print("outside OutOfResourcesError", "free" in str(e))
with shmarray.allocating():
    ok = np.ones(2 << 20)  # 16 MiB: fine again
print("sum", int(ok.sum()), int(small.sum()))
"""


def test_full_directory_is_out_of_resources_never_sigbus(tmp_path: Any) -> None:
    out = run_with_small_dev_shm(_FULL, tmp_path, "64m")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "inside MemoryError"
    assert lines[1] == "outside OutOfResourcesError True"
    assert lines[2] == f"sum {2 << 20} {1 << 20}"


_ERRORS = """
import numpy as np, shmarray

def made_inside():
    with shmarray.allocating(min_bytes=4096):
        return np.ones(1 << 16)

cases = {
    "broadcast": lambda: np.ones(5) + np.ones(3),
    "nested": lambda: (np.ones(5) + np.ones(5)) + (np.ones(5) + np.ones(3)),
    "nested big": lambda: (np.ones(1 << 17) + 1) + (np.ones(1 << 17) + np.ones(3)),
    "ufunc in ufunc": lambda: np.add(np.ones(5), np.add(np.ones(5), np.ones(3))),
    "index in a list": lambda: [np.ones(5), np.ones(5)[7]],
    "reshape": lambda: np.ones(3).reshape(2, 2),
    "concatenate": lambda: np.concatenate([np.ones(5), np.ones((2, 2))]),
    "raise in a function": lambda: (lambda t: {}["boom"])(np.ones(1 << 17)),
}
for name, case in cases.items():
    for _ in range(3):  # a first call and the specialised ones
        with shmarray.allocating(min_bytes=4096):
            try:
                case()
            except (ValueError, IndexError, KeyError) as e:
                kind = type(e).__name__
    print(name, kind)
try:
    made_inside() + np.ones(3)  # made in a block, freed while the error leaves this line
except ValueError:
    print("outside ValueError")
"""


def test_errors_inside_the_block_arrive_as_numpy_raised_them() -> None:
    """NumPy frees temporaries while an exception propagates: the allocator must neither lose nor replace it.

    Before the native shim in front of the callbacks, these were a
    SystemError ("error return without exception set") or a segfault.
    """
    out = subprocess.run([sys.executable, "-c", _ERRORS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "broadcast ValueError", "nested ValueError", "nested big ValueError", "ufunc in ufunc ValueError",
        "index in a list IndexError", "reshape ValueError", "concatenate ValueError",
        "raise in a function KeyError", "outside ValueError"]


_FULL_IN_AN_EXPRESSION = """
import numpy as np, shmarray
for _ in range(3):
    try:
        with shmarray.allocating():
            a = np.ones(12 << 17)   # 12 MiB of the 32
            b = a * 2 + a ** 2      # a * 2 fits, a ** 2 does not: freed while MemoryError propagates
    except shmarray.OutOfResourcesError as e:
        print("OutOfResourcesError", "does not fit" in str(e))
    del a
print("alive")
"""


def test_full_directory_inside_an_expression(tmp_path: Any) -> None:
    out = run_with_small_dev_shm(_FULL_IN_AN_EXPRESSION, tmp_path, "32m")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["OutOfResourcesError True"] * 3 + ["alive"]


_POOL_GIVES_WAY = """
import numpy as np, shmarray, os
for k in range(3):
    with shmarray.allocating():
        a = np.ones((5 + k) << 17)      # 5, 6, 7 MiB, kept for reuse when freed
    del a
st = os.statvfs("/dev/shm")
print("kept", (st.f_blocks - st.f_bfree) * st.f_frsize >> 20)
s = shmarray.share("pool-gives-way", np.ones(55 << 17))   # 55 of 64 MiB: fits once the pool gives way
print("share", float(s[-1]))
s.close()
del s  # the array's own mapping goes with it
for k in range(3):
    with shmarray.allocating():
        a = np.ones((5 + k) << 17)
    del a
c = shmarray.create("pool-gives-way-2", 55 << 17, "f8")
print("create", c.shape[0] == 55 << 17)
"""


def test_memory_kept_for_reuse_gives_way_to_share_and_create(tmp_path: Any) -> None:
    out = run_with_small_dev_shm(_POOL_GIVES_WAY, tmp_path, "64m")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["kept 13", "share 1.0", "create True"]


_CTRL_C = """
import numpy as np, shmarray, sys, time
work = sys.argv[1]
print("ready", flush=True)
t0 = time.monotonic()
try:
    with shmarray.allocating(min_bytes=4096):
        while time.monotonic() - t0 < 30:
            if work == "temporaries":
                a = (np.ones(1 << 12) + 1) * 2
            else:  # realloc: fromiter grows its buffer
                a = np.fromiter(range(3000), dtype=np.float64)
            del a
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
print("not interrupted")
"""


@pytest.mark.parametrize("work", ["temporaries", "fromiter"])
def test_ctrl_c_in_a_busy_block_arrives_as_keyboard_interrupt(work: str, tmp_path: Any) -> None:
    """A Ctrl-C whose handler ran inside an allocator callback was lost, or became a MemoryError.

    Seen before the shim ran due signal handlers ahead of the callback:
    10 of 20 Ctrl-Cs lost, 4 of 20 MemoryErrors, and crashes (a callback
    that raised returned a garbage address).
    """
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C)
    for _ in range(4):
        p = subprocess.Popen([sys.executable, str(script), work], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout is not None
            first = p.stdout.readline()
            if first != "ready\n":
                p.kill()
                _, err = p.communicate()
                pytest.fail(f"the script did not start: {first!r}, rc {p.returncode}, stderr {err[-2000:]}")
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=15)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 0 and out == "interrupted\n", (p.returncode, out, err[-2000:])
        assert "Exception ignored" not in err, err[-2000:]


def test_a_machine_without_the_shim_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(shmarray.UnknownShmError, match="x86-64"):
        with shmarray.allocating(min_bytes=12345):
            pytest.fail("the block ran without an allocator")
    assert not in_shared(np.ones(1 << 20))


def test_min_bytes_is_checked() -> None:
    with pytest.raises(shmarray.InvalidSizeError):
        shmarray.allocating(0)
    with pytest.raises(TypeError):
        shmarray.allocating(1.5)  # type: ignore[arg-type]
