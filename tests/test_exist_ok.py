"""create(..., exist_ok=True): get-or-create, for a notebook cell run again after a kernel restart."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

import shmarray

from _procs import run, start


def test_same_spec_attaches_the_existing_array_untouched(key):
    a = shmarray.create(key, (3, 4), np.float32, fill=2)
    b = shmarray.create(key, (3, 4), np.float32, fill=5, exist_ok=True)  # the cell run again
    assert (b == 2).all()  # fill applies only to a new array
    b[0, 0] = 9
    assert a[0, 0] == 9 and b.key == key and type(b) is shmarray.SharedArray


def test_creates_when_missing(key):
    a = shmarray.create(key, 5, "i4", fill=7, exist_ok=True)
    assert (a == 7).all() and a.dtype == np.int32


@pytest.mark.parametrize("shape, dtype, order, names", [
    ((4, 3), np.float32, "C", "shape (4, 3)"),
    ((3, 4), np.float64, "C", "dtype float64"),
    ((3, 4), np.float32, "F", "order 'F'"),
])
def test_a_different_spec_names_both(key, shape, dtype, order, names):
    a = shmarray.create(key, (3, 4), np.float32)
    with pytest.raises(shmarray.AlreadyExistsError) as err:
        shmarray.create(key, shape, dtype, order=order, exist_ok=True)
    text = str(err.value)
    assert "dtype float32, shape (3, 4), order 'C'" in text and names in text and key in text
    assert a.shape == (3, 4)


def test_one_dimension_has_one_order(key):
    a = shmarray.create(key, 6, order="F")
    b = shmarray.create(key, 6, exist_ok=True)
    assert b.size == a.size == 6


def test_a_table_under_the_key_is_not_an_array(key):
    pa = pytest.importorskip("pyarrow")
    t = shmarray.share_table(key, pa.table({"x": [1]}))
    with pytest.raises(shmarray.AlreadyExistsError, match="does not hold an array"):
        shmarray.create(key, 3, exist_ok=True)
    assert t.num_rows == 1


def test_without_exist_ok_it_still_raises(key):
    a = shmarray.create(key, 3)
    with pytest.raises(shmarray.AlreadyExistsError):
        shmarray.create(key, 3)
    assert a.size == 3


def _race(key: str, start: "mp.synchronize.Barrier", me: int) -> tuple[int, float]:  # type: ignore[name-defined]
    start.wait(30)
    a = shmarray.create(key, (64, 64), np.float64, exist_ok=True)
    with a.lock():
        a[0, 0] += 1  # every racer's write lands in the one array
    start.wait(30)  # all still hold it: it must be one segment, whoever created it
    inc = a.segment._reference()[1]
    return inc, float(a[0, 0])


def test_racing_creators_all_end_with_the_same_segment(key):
    n = 4
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    children = [start(_race, key, barrier, i) for i in range(n)]
    try:
        got = [c.result(timeout=60) for c in children]
    finally:
        for c in children:
            c.close()
    incarnations = {inc for inc, _ in got}
    assert len(incarnations) == 1, got
    assert {v for _, v in got} == {float(n)}


def _attach_sum(key: str) -> float:
    return float(shmarray.create(key, 8, exist_ok=True).sum())


def test_another_process_gets_the_existing_array(key):
    a = shmarray.create(key, 8, fill=1.5)
    assert run(_attach_sum, key) == 12.0
    assert a.sum() == 12.0


def test_persistence_is_part_of_the_spec(key):
    a = shmarray.create(key, 3)
    with pytest.raises(shmarray.AlreadyExistsError, match="not persistent"):
        shmarray.create(key, 3, persistent=True, exist_ok=True)  # silently non-persistent would lose it
    assert a.size == 3
