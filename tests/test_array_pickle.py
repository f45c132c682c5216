"""Pickling SharedArrays by reference: views, pools of real processes, joblib, torch DataLoader."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing as mp
import pickle

import numpy as np
import pytest

import shmarray
from shmarray import SharedArray
from _procs import CONTEXTS, run


def _offset(a: SharedArray) -> int:
    """Where the view's first element lies, from the start of its segment's user bytes."""
    origin = np.frombuffer(a._shm_map, np.uint8, count=1).__array_interface__["data"][0]
    return a.__array_interface__["data"][0] - origin


@pytest.fixture
def big(key):
    a = shmarray.create(key, (512, 1024), np.float64)  # 4 MiB
    a[...] = np.arange(a.size, dtype=np.float64).reshape(a.shape)
    return a


def _views(a):
    return [a, a[3:17], a[::3, ::-2], a.T, a[5], a[2:9, 100:3:-7].T, a.view(np.uint8)[1:, 8:80],
            a.reshape(-1)[1000:2000], a[10:11, 20:21], a[0:0], a[4:4, :], a[..., 7], a[::-1]]


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_a_small_reference(big, protocol):
    for v in _views(big):
        data = pickle.dumps(v, protocol=protocol)
        assert len(data) < 400, (len(data), v.shape)
        back = pickle.loads(data)
        assert type(back) is SharedArray and back.key == big.key
        assert back.shape == v.shape and back.strides == v.strides and back.dtype == v.dtype
        assert back.tobytes() == v.tobytes()
        assert back.segment is not big.segment  # its own attachment
        if back.size:
            back.reshape(-1)[0] = -1.0 if back.dtype == np.float64 else 255
            assert v.reshape(-1)[0] == back.reshape(-1)[0]  # the same memory


def test_unpickled_view_lies_where_the_original_does(big):
    for v in _views(big):
        back = pickle.loads(pickle.dumps(v))
        assert _offset(back) == _offset(v) and back.strides == v.strides


def test_unpickling_a_removed_segment_is_not_found(key):
    a = shmarray.create(key, 10)
    data = pickle.dumps(a[2:5])
    a.close()
    del a
    gc.collect()
    with pytest.raises(shmarray.NotFoundError, match=key):
        pickle.loads(data)


def test_unpickling_into_a_replaced_smaller_segment_is_refused(key):
    a = shmarray.create(key, 1000)
    data = pickle.dumps(a[900:])
    a.close()
    del a
    gc.collect()
    b = shmarray.create(key, 10)
    # The reference names the instance: the new segment is not it.
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced"):
        pickle.loads(data)
    assert b.segment.is_attached


def test_a_copy_pickles_by_value(big):
    c = big[[1, 2]]
    assert type(c) is np.ndarray
    assert len(pickle.dumps(c)) > c.nbytes
    plain = np.asarray(big)
    assert type(plain) is np.ndarray and len(pickle.dumps(plain)) > plain.nbytes
    orphan = np.zeros(3).view(SharedArray)  # a SharedArray outside any segment
    back = pickle.loads(pickle.dumps(orphan))
    assert type(back) is np.ndarray and np.array_equal(back, orphan)


def test_readonly_flag_travels(big):
    v = big[1:3]
    v.flags.writeable = False
    back = pickle.loads(pickle.dumps(v))
    assert not back.flags.writeable and back.segment.mode == shmarray.AccessMode.ReadOnly
    with pytest.raises(ValueError):
        back.setflags(write=True)


# -- through pools of real processes -------------------------------------------------------------


def _double(view: SharedArray) -> tuple[str, str | None, float]:
    """Runs in a worker: doubles its slice in place, under the segment lock."""
    with view.lock():
        view *= 2
    return type(view).__name__, view.key, float(view.sum())


def _chunks(a: SharedArray, n: int = 8) -> list[SharedArray]:
    step = a.shape[0] // n
    return [a[i : i + step] for i in range(0, a.shape[0], step)]


def _check_doubled(a: SharedArray, before: np.ndarray, results: list) -> None:
    assert all(r[0] == "SharedArray" and r[1] == a.key for r in results)
    np.testing.assert_array_equal(np.asarray(a), before * 2)
    assert sum(r[2] for r in results) == pytest.approx(float(before.sum()) * 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", CONTEXTS)
def test_multiprocessing_pool(big, method):
    before = np.array(big)
    with mp.get_context(method).Pool(2) as pool:
        results = pool.map(_double, _chunks(big))
    _check_doubled(big, before, results)


@pytest.mark.timeout(120)
def test_process_pool_executor(big):
    before = np.array(big)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        results = list(ex.map(_double, _chunks(big)))
    _check_doubled(big, before, results)


@pytest.mark.timeout(120)
def test_joblib_loky(big, tmp_path):
    joblib = pytest.importorskip("joblib")
    from joblib.externals.loky import get_reusable_executor

    before = np.array(big)
    try:
        # big is 4 MiB, over joblib's 1 MB auto-memmapping threshold: it must still travel as a reference.
        # (temp_folder: joblib would otherwise leave its memmapping folders in /dev/shm.)
        with joblib.Parallel(n_jobs=2, backend="loky", temp_folder=str(tmp_path)) as parallel:
            results = parallel(joblib.delayed(_double)(c) for c in _chunks(big))
            whole = parallel(joblib.delayed(_describe)(big) for _ in range(2))
    finally:
        get_reusable_executor().shutdown(wait=True)  # idle loky workers must not keep it attached
    _check_doubled(big, before, results)
    assert whole == [("SharedArray", big.key, big.shape)] * 2


def _describe(a: SharedArray) -> tuple:
    return type(a).__name__, a.key, a.shape


class _Rows:
    """A torch Dataset over a SharedArray (a module-level class, so spawned workers can import it)."""

    def __init__(self, a: SharedArray) -> None:
        self.a = a

    def __len__(self) -> int:
        return self.a.shape[0]

    def __getitem__(self, i: int):
        import torch

        row = self.a[i]
        with self.a.lock():
            row[-1] = -i  # written through the worker's own attachment
        return torch.from_numpy(np.array(row)), type(row).__name__


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_torch_dataloader_workers(key, context):
    torch = pytest.importorskip("torch")
    a = shmarray.create(key, (64, 16), np.float32)
    a[:, :-1] = np.arange(64 * 15, dtype=np.float32).reshape(64, 15)
    loader = torch.utils.data.DataLoader(_Rows(a), batch_size=8, num_workers=2,
                                         multiprocessing_context=context)
    seen = 0
    for batch, kinds in loader:
        assert batch.shape == (8, 16) and set(kinds) == {"SharedArray"}
        seen += batch.shape[0]
    del loader
    gc.collect()
    assert seen == 64
    np.testing.assert_array_equal(a[:, -1], -np.arange(64, dtype=np.float32))


def _unpickle_and_sum(data: bytes) -> float:
    return float(pickle.loads(data).sum())


def test_pickled_bytes_work_in_a_spawned_process(big):
    v = big[100:200:3, ::5]
    assert run(_unpickle_and_sum, pickle.dumps(v)) == pytest.approx(float(v.sum()))
