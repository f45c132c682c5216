"""SharedArray: create/share/attach, every fixed-size dtype across processes, the memmap model,
lifetime, the lock, read-only mappings, bad input."""

from __future__ import annotations

import gc
import os
import pickle

import numpy as np
import pytest

import shmarray
from conftest import SHM
from shmarray import SharedArray
from _procs import run, run_with_small_dev_shm

# -- dtypes -------------------------------------------------------------------------------------

PLAIN = [
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g", "c8", "c16", "G",
    ">i2", ">i4", ">i8", ">u2", ">u8", ">f2", ">f4", ">f8", ">c8", ">c16",
    "M8", "M8[Y]", "M8[D]", "M8[s]", "M8[ns]", "M8[25s]", ">M8[ms]", "m8[us]", "m8[W]", ">m8[ps]",
    "S1", "S7", "U1", "U5", ">U3", "V1", "V12",
]
STRUCTURED = {
    "flat": np.dtype([("a", "i4"), ("b", "f8"), ("c", "S3")]),
    "nested": np.dtype([("pos", [("x", "f4"), ("y", "f4")]), ("id", ">u8"), ("when", "M8[ms]")]),
    "aligned": np.dtype([("a", "u1"), ("b", "f8"), ("c", "i2"), ("d", "c8")], align=True),
    "subarray": np.dtype([("m", "f4", (3, 3)), ("tag", "S4"), ("v", ">i2", (2,))]),
    "nested-aligned": np.dtype([("h", "u1"), ("inner", np.dtype([("a", "u1"), ("b", "f8")], align=True))],
                               align=True),
    "offsets": np.dtype({"names": ["a", "b"], "formats": ["u1", "<u4"], "offsets": [0, 8], "itemsize": 16}),
    "titles": np.dtype({"names": ["a", "b"], "formats": ["i4", "f4"], "titles": ["first field", None]}),
    "utf8-names": np.dtype([("ñame", "i4"), ("日本", "f8")]),
    "unicode-fields": np.dtype([("name", "U8"), ("score", ">f8")]),
    "deep": np.dtype([("a", [("b", [("c", [("d", "i2", (2,))])])])]),
}
ALL_DTYPES = [np.dtype(d) for d in PLAIN] + list(STRUCTURED.values())
IDS = PLAIN + list(STRUCTURED)


def _random(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """An array of *dtype* holding random bytes (every bit pattern survives a bytes round trip)."""
    n = int(np.prod(shape))
    raw = np.random.default_rng(seed).integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape) if n else np.zeros(shape, dtype)


def _describe(a: np.ndarray) -> dict:
    return {
        "type": type(a).__name__, "dtype": a.dtype, "descr": a.dtype.descr, "shape": a.shape,
        "c": a.flags.c_contiguous, "f": a.flags.f_contiguous, "bytes": a.tobytes(order="A"),
        "aligned": a.ctypes.data % 64 == 0, "writeable": a.flags.writeable,
        "fields": None if a.dtype.fields is None else {k: v[1] for k, v in a.dtype.fields.items()},
    }


def _attach_all(keys: list[str]) -> list[dict]:
    out = []
    for k in keys:
        with shmarray.attach(k) as a:
            out.append(_describe(a))
    return out


def test_every_dtype_round_trips_through_a_spawned_process(make_key):
    shared, keys = [], []
    for i, dt in enumerate(ALL_DTYPES):
        for j, (shape, order) in enumerate([((3, 4), "C"), ((2, 3, 2), "F"), ((), "C"), ((0, 5), "C")]):
            src = np.asarray(_random(shape, dt, seed=i * 10 + j), order=order)
            k = make_key("dt")
            shared.append((src, shmarray.share(k, src)))
            keys.append(k)
    got = run(_attach_all, keys, timeout=60)
    for (src, mine), theirs in zip(shared, got):
        want = _describe(src)
        assert theirs["type"] == "SharedArray"
        assert theirs["dtype"] == src.dtype, (src.dtype, theirs["dtype"])
        assert theirs["descr"] == want["descr"] and theirs["fields"] == want["fields"]
        assert theirs["dtype"].itemsize == src.dtype.itemsize
        assert theirs["shape"] == src.shape and theirs["bytes"] == want["bytes"]
        assert (theirs["c"], theirs["f"]) == (want["c"], want["f"]), src.dtype
        assert theirs["aligned"] and theirs["writeable"]
        assert _describe(mine)["bytes"] == want["bytes"]


def test_create_every_dtype_zero_and_filled(make_key):
    for dt in ALL_DTYPES:
        a = shmarray.create(make_key("z"), (4, 3), dt)
        assert a.dtype == dt and a.shape == (4, 3) and not a.tobytes().strip(b"\0")
    for dt, fill in [("f8", 1.5), ("i2", -7), (">u4", 7), ("c16", 1 - 2j), ("M8[s]", "2024-01-02T03:04:05"),
                     ("U4", "abc"), ("S2", b"xy"), ("?", True), (STRUCTURED["flat"], (1, 2.5, b"q")),
                     ("f2", np.nan)]:
        a = shmarray.create(make_key("f"), (5, 1000), dt, fill=fill, order="F")
        item = np.zeros((), dt)
        item[()] = fill
        want = np.empty((5, 1000), dt)
        want[...] = item
        assert a.flags.f_contiguous and a.tobytes() == want.tobytes()


def test_large_fill_and_share_match(make_key):
    n = 3 * (1 << 20) + 7  # not a multiple of the write chunk
    a = shmarray.create(make_key(), n, np.int32, fill=-3)
    assert a.shape == (n,) and (a == -3).all()
    src = np.arange(n, dtype=np.float64)[::-1]
    b = shmarray.share(make_key(), src)
    assert np.array_equal(b, src)


def test_non_contiguous_input_is_stored_contiguous(make_key):
    base = _random((40, 30, 20), np.dtype("f8"))
    for view in (base[::2, 1::3, ::-1], base.transpose(2, 0, 1)[1:, :, ::2], base[:, 5, :], base[..., ::7].T):
        a = shmarray.share(make_key(), view)
        assert a.flags.c_contiguous or a.flags.f_contiguous
        assert np.array_equal(a, view, equal_nan=True) and a.tobytes() == view.tobytes()
    big = np.arange(6 * (1 << 20), dtype=np.uint8).reshape(2, -1)[:, ::3]  # rows larger than the bounce buffer
    assert np.array_equal(shmarray.share(make_key(), big), big)
    tall = np.arange(300_000, dtype=np.int64).reshape(-1, 2)[:, ::-1]
    assert np.array_equal(shmarray.share(make_key(), tall), tall)


def test_fortran_input_keeps_fortran_order(make_key):
    src = np.asfortranarray(_random((50, 7), np.dtype("i4")))
    a = shmarray.share(make_key(), src)
    assert a.flags.f_contiguous and not a.flags.c_contiguous and np.array_equal(a, src)
    b = shmarray.attach(a.key)
    assert b.flags.f_contiguous and np.array_equal(b, src)


def test_data_is_64_byte_aligned(make_key):
    for dt in ("u1", "c16", STRUCTURED["nested"]):
        a = shmarray.create(make_key(), 10, dt)
        assert a.ctypes.data % 64 == 0
        assert shmarray.attach(a.key).ctypes.data % 64 == 0


def test_metadata_on_a_dtype_is_dropped_not_an_error(make_key):
    dt = np.dtype("f8", metadata={"unit": "m"})
    a = shmarray.share(make_key(), np.zeros(3, dt))
    assert a.dtype == np.dtype("f8") and shmarray.attach(a.key).dtype == np.dtype("f8")


# -- the memmap model (mirrors numpy's test_memmap) ---------------------------------------------------


@pytest.fixture
def fp(key):
    a = shmarray.create(key, (3, 4), np.float32)
    a[...] = np.arange(12, dtype=np.float32).reshape(3, 4)
    return a


def test_slicing_keeps_references(fp):
    assert fp[:2, :2].segment is fp.segment
    assert type(fp[:2, :2]) is SharedArray


def test_views_stay_shared_arrays(fp):
    for v in (fp[1], fp[1:], fp[:, ::2], fp.T, fp.transpose(), fp.reshape(4, 3), fp.reshape(-1),
              fp.ravel(), fp.view(), fp.view(np.int32), fp.view(np.uint8), fp[np.newaxis], fp[..., 1],
              fp.squeeze(), fp.swapaxes(0, 1), fp[0:0], fp.real, np.split(fp, 3)[1]):
        assert type(v) is SharedArray and v.segment is fp.segment and v.key == fp.key
        assert np.shares_memory(v, fp) or v.size == 0


def test_copies_and_ufunc_results_are_plain_ndarrays(fp):
    for r in (fp + 1, np.sqrt(fp), fp * fp, -fp, fp[[0, 1]], fp[fp > 3], fp[[True, False, True]],
              fp.copy(), fp.astype(np.float64), fp.flatten(), fp.T.ravel(), fp.T.reshape(-1), fp.sum(axis=0),
              fp.mean(axis=1), fp.cumsum(), np.concatenate([fp, fp]), np.sort(fp, axis=0), fp.take([0, 2]),
              fp.repeat(2), np.where(fp > 2, fp, 0), fp.dot(fp.T), fp @ fp.T, fp.round(), fp.clip(1, 2),
              np.asarray(fp), np.array(fp), fp[:, [0]], np.copy(fp)):
        assert type(r) is np.ndarray, type(r)
        assert not isinstance(r, SharedArray)
    import copy

    assert type(copy.copy(fp)) is np.ndarray and type(copy.deepcopy(fp)) is np.ndarray


def test_reductions_give_scalars(fp):
    assert type(fp.sum()) is np.float32 and fp.sum() == 66
    assert type(fp.max()) is np.float32 and type(np.mean(fp)) in (np.float32, np.float64)
    assert type(fp[1, 2]) is np.float32 and fp[1, 2] == 6


def test_in_place_ufunc_stays_in_the_segment(fp):
    r = np.add(fp, 1, out=fp)
    assert r is fp and fp[0, 0] == 1
    fp += 1
    assert type(fp) is SharedArray and fp[0, 0] == 2
    v = fp[1:]
    np.multiply(v, 0, out=v)
    assert (fp[1:] == 0).all()


def test_np_asarray_is_plain_and_pickles_by_value(fp):
    plain = np.asarray(fp)
    assert type(plain) is np.ndarray and np.shares_memory(plain, fp)
    data = pickle.dumps(plain)
    assert len(data) > plain.nbytes
    back = pickle.loads(data)
    assert type(back) is np.ndarray and not np.shares_memory(back, fp)


def test_repr_shows_the_key(fp):
    text = repr(fp)
    assert text.startswith("SharedArray(") and f"key={fp.key!r}" in text
    assert f"key={fp.key!r}" in repr(fp[1:])
    assert repr(np.asarray(fp)).startswith("array(")


def test_cannot_be_constructed_directly():
    with pytest.raises(TypeError, match="shmarray.create"):
        SharedArray((3,))


# -- lifetime -----------------------------------------------------------------------------------------


def _inode(native: str) -> int:
    return os.stat(f"{SHM}/{native}").st_ino


def _mapped_here(inode: int) -> bool:
    """True while this process maps the object with this inode (its name may be gone)."""
    with open("/proc/self/maps") as f:
        return any(len(p) >= 5 and p[4] == str(inode) for p in (line.split() for line in f))


def _exists(key: str) -> bool:
    return run(_can_attach, key)


def _can_attach(key: str) -> bool:
    try:
        shmarray.attach(key).close()
    except shmarray.NotFoundError:
        return False
    return True


def test_a_live_view_keeps_the_segment_attached(key):
    a = shmarray.create(key, 1000)
    v = a[10:20]
    native = a.segment.native_key
    inode = _inode(native)
    del a
    gc.collect()
    assert _exists(key)  # the view holds the Segment
    v[:] = 7
    del v
    gc.collect()
    assert not os.path.exists(f"{SHM}/{native}")  # the last view took the segment with it
    assert not _mapped_here(inode)


def test_close_detaches_now_and_views_keep_working(key):
    a = shmarray.create(key, (100, 100), fill=2.0)
    v = a[5:10]
    native = a.segment.native_key
    inode = _inode(native)
    a.close()
    a.close()  # idempotent
    assert not a.segment.is_attached and v.segment is a.segment
    assert not os.path.exists(f"{SHM}/{native}")
    assert (v == 2.0).all()  # still mapped
    v[0, 0] = 3.0
    assert a[5, 0] == 3.0
    assert _mapped_here(inode)
    del a, v
    gc.collect()
    assert not _mapped_here(inode)  # unmapped with the last view


def test_with_attach_closes(key):
    a = shmarray.create(key, 10)
    with shmarray.attach(key) as b:
        assert type(b) is SharedArray and b.segment.is_attached
        seg = b.segment
    assert not seg.is_attached
    assert a.segment.is_attached


def test_persistent_outlives_its_creator(key):
    a = shmarray.create(key, (4, 4), np.int16, fill=9, persistent=True)
    a.close()
    del a
    gc.collect()
    b = shmarray.attach(key)
    assert (b == 9).all() and b.segment.persistent
    b.close()
    shmarray.unlink(key)
    with pytest.raises(shmarray.NotFoundError, match=key):
        shmarray.attach(key)


def _write_under_lock(key: str, value: float) -> float:
    with shmarray.attach(key) as a:
        with a.lock() as same:
            assert same is a
            same[...] += value
        with a.lock(shared=True):
            return float(a.sum())


def test_other_processes_see_writes(key):
    a = shmarray.create(key, 8)
    assert run(_write_under_lock, key, 1.5) == 12.0
    assert (a == 1.5).all()


def test_lock_excludes_and_times_out(key):
    a = shmarray.create(key, 8)
    b = shmarray.attach(key)
    with a.lock():
        with pytest.raises(shmarray.LockError, match=key):
            with b.lock(timeout=0.05):
                pass
    with b.lock(timeout=0):
        assert a.segment.lock_held is None and b.segment.lock_held == "exclusive"
    with a.lock(shared=True), b.lock(shared=True, timeout=0):
        pass


def test_lock_on_a_copy_or_closed_array_is_a_lock_error(key):
    a = shmarray.create(key, 8)
    with pytest.raises(shmarray.LockError):
        a.copy().view(SharedArray).lock()
    a.close()
    with pytest.raises(shmarray.LockError):
        with a.lock():
            pass


def test_key_and_segment(key):
    a = shmarray.create(key, 3)
    assert a.key == key and isinstance(a.segment, shmarray.Segment) and a.segment.key == key
    assert a.segment.size >= a.nbytes + 64


# -- read-only ---------------------------------------------------------------------------------------


def test_readonly_has_no_write_path(key):
    a = shmarray.create(key, (4, 4), fill=1.0)
    r = shmarray.attach(key, readonly=True)
    assert not r.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        r[0, 0] = 5
    with pytest.raises(ValueError):
        r += 1
    with pytest.raises(ValueError):
        r.setflags(write=True)
    with pytest.raises(ValueError):
        np.asarray(r).setflags(write=True)
    for v in (r[1:], r.T, r.view(np.uint8), r.reshape(-1)):
        assert not v.flags.writeable
        with pytest.raises(ValueError):
            v.setflags(write=True)
    base = r.base
    while isinstance(base, np.ndarray):
        base = base.base
    with pytest.raises(TypeError):
        base[0:1] = b"x"  # the mmap itself
    with pytest.raises(ValueError):
        np.frombuffer(base, np.uint8).setflags(write=True)
    assert memoryview(r).readonly and r.segment.data.readonly
    with pytest.raises(TypeError):
        r.segment.data[0:1] = b"x"
    back = pickle.loads(pickle.dumps(r[2:]))
    assert not back.flags.writeable
    with pytest.raises(ValueError):
        back.setflags(write=True)
    with pytest.raises(ValueError):
        np.copyto(r, 0)
    assert (a == 1.0).all()


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, exc, words", [
    (-1, ValueError, "negative"),
    ((3, -2), ValueError, "negative"),
    ((1,) * 65, ValueError, "dimensions"),
    (2.5, TypeError, "ints"),
    ((3, 2.0), TypeError, "ints"),
    ("abc", TypeError, "ints"),
    (None, TypeError, "ints"),
    ((2, True), TypeError, "bool"),
])
def test_bad_shapes(key, shape, exc, words):
    with pytest.raises(exc, match=words):
        shmarray.create(key, shape)


@pytest.mark.parametrize("shape", [(1 << 40, 1 << 40), (1 << 62,), (1 << 70,), (10**30, 0, 10**30)])
def test_absurd_sizes_are_out_of_resources(key, shape):
    if 0 in shape:
        with pytest.raises(ValueError):  # zero bytes, but more elements than numpy can index
            shmarray.create(key, shape)
        return
    with pytest.raises(shmarray.OutOfResourcesError, match="free"):
        shmarray.create(key, shape)


def test_size_beyond_free_space_is_out_of_resources(key):
    free = shmarray._os.backend.free_bytes()
    # Twice what is free: memory kept for reuse (given back first) can never make it fit,
    # and no allocation is attempted.
    with pytest.raises(shmarray.OutOfResourcesError, match="free") as e:
        shmarray.create(key, (free // 8) * 2 + 1024, np.float64)
    assert isinstance(e.value, MemoryError) and e.value.key == key


@pytest.mark.parametrize("dtype, words", [
    ("not-a-dtype", "not a numpy dtype"),
    ("f7", "not a numpy dtype"),
    (object, "Python objects"),
    ("O", "Python objects"),
    ([("a", "i4"), ("b", "O")], "field 'b'"),
    ([("x", [("y", object)])], "Python objects"),
])
def test_bad_dtypes(key, dtype, words):
    with pytest.raises(TypeError, match=words):
        shmarray.create(key, 3, dtype)


def test_variable_width_string_dtype_is_refused(key):
    string_dtype = getattr(getattr(np, "dtypes", None), "StringDType", None)
    if string_dtype is None:
        pytest.skip("numpy < 2 has no StringDType")
    with pytest.raises(TypeError, match="fixed-size"):
        shmarray.create(key, 3, string_dtype())
    with pytest.raises(TypeError, match="fixed-size"):
        shmarray.share(key, np.array(["a", "bc"], dtype=string_dtype()))


@pytest.mark.parametrize("data", [[1, 2, 3], (1.0,), "abc", b"xyz", 3.5, None, memoryview(b"ab")])
def test_share_needs_an_ndarray(key, data):
    with pytest.raises(TypeError, match="numpy.ndarray"):
        shmarray.share(key, data)


def test_share_of_objects_is_refused(key):
    with pytest.raises(TypeError, match="Python objects"):
        shmarray.share(key, np.array([object(), 1], dtype=object))
    with pytest.raises(TypeError, match="field 'o'"):
        shmarray.share(key, np.zeros(2, [("i", "i4"), ("o", "O")]))


def test_bad_order_and_fill(key):
    with pytest.raises(ValueError, match="order"):
        shmarray.create(key, 3, order="K")
    with pytest.raises(ValueError, match="fill value"):
        shmarray.create(key, 3, np.float64, fill="abc")
    with pytest.raises(ValueError, match="fill value"):
        shmarray.create(key, 3, np.uint8, fill=300)
    with pytest.raises(ValueError, match="fill value"):
        shmarray.create(key, 3, [("a", "i4"), ("b", "f4")], fill=(1, 2, 3))


def test_bad_keys(key):
    with pytest.raises(shmarray.InvalidKeyError):
        shmarray.create("", 3)
    with pytest.raises(shmarray.InvalidKeyError):
        shmarray.share("x" * 2000, np.zeros(3))
    with pytest.raises(TypeError):
        shmarray.attach(42)


def test_existing_key_and_missing_key(key):
    a = shmarray.create(key, 3)
    with pytest.raises(shmarray.AlreadyExistsError, match=key):
        shmarray.create(key, 3)
    with pytest.raises(shmarray.AlreadyExistsError, match=key):
        shmarray.share(key, np.zeros(3))
    with pytest.raises(shmarray.NotFoundError, match="nope"):
        shmarray.attach(f"{key}-nope")
    assert a.key == key


def test_zero_size_and_0d(make_key):
    z = shmarray.create(make_key(), (0, 7), np.int8)
    assert z.shape == (0, 7) and z.segment.size > 0
    assert shmarray.attach(z.key).shape == (0, 7)
    s = shmarray.share(make_key(), np.array(2.5))
    assert s.shape == () and s[()] == 2.5 and type(s) is SharedArray
    s[()] = 4.0
    assert shmarray.attach(s.key)[()] == 4.0
    e = shmarray.share(make_key(), np.zeros((3, 0), dtype="U4"))
    assert shmarray.attach(e.key).dtype == np.dtype("U4")


FULL_SHM = """
import os
import numpy as np
import shmarray
from shmarray._os import backend

keep = shmarray.create("full-a", 40 << 20, np.uint8)   # 40 of 64 MiB
for label, make in [
    ("create", lambda k: shmarray.create(k, 40 << 20, np.uint8)),
    ("fill", lambda k: shmarray.create(k, 5 << 20, np.float64, fill=1.5)),
    ("share", lambda k: shmarray.share(k, np.ones(5 << 20))),
]:
    try:
        make(f"full-{label}")
    except shmarray.OutOfResourcesError as e:
        print(f"precheck {label}:", e)
# Pretend the space check passed (another process raced us): the write itself must refuse.
backend.free_bytes = lambda *_: 1 << 40
for label, make in [
    ("create", lambda k: shmarray.create(k, 40 << 20, np.uint8)),
    ("fill", lambda k: shmarray.create(k, 5 << 20, np.float64, fill=1.5)),
    ("share", lambda k: shmarray.share(k, np.ones(5 << 20))),
    ("share-strided", lambda k: shmarray.share(k, np.ones((5 << 20, 2))[:, 0])),
]:
    try:
        make(f"full-{label}")
    except shmarray.OutOfResourcesError as e:
        print(f"write {label}:", e)
print("left:", sorted(n for n in os.listdir(backend.SHM_DIR) if n.startswith(("shmarray_", ".shmarray"))))
"""


def test_full_dev_shm_is_out_of_resources_not_sigbus(tmp_path):
    """create/share into a 64 MiB /dev/shm (Docker's default), in a private mount namespace."""
    out = run_with_small_dev_shm(FULL_SHM, tmp_path)
    assert out.returncode == 0, out.stderr  # a SIGBUS would be -7
    for label in ("create", "fill", "share"):
        assert f"precheck {label}: " in out.stdout and "free" in out.stdout
    for label in ("create", "fill", "share", "share-strided"):
        assert f"write {label}: " in out.stdout, out.stdout
    left = out.stdout.split("left:")[1]
    assert "full-a" in left and left.count("shmarray_") == 1 and ".shmarray" not in left
