"""The transfer rules without Dask: by value to another host, deferred forwarding, lenient reading;
and table handles."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import shmarray
from shmarray import _transfer
from shmarray._os import backend


def _forged(a: shmarray.SharedArray, host: int) -> bytes:
    fn, args = a.__reduce_ex__(5)

    class Forged:
        def __reduce__(self):  # noqa: ANN204
            ref, detail = args  # Reference: key, native, mode, host, incarnation, dir
            return fn, ((*ref[:3], host, *ref[4:]), detail)

    return pickle.dumps(Forged())


def test_plain_pickle_is_a_reference(key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    raw = pickle.dumps(a)
    assert len(raw) < 150
    b = pickle.loads(raw)
    assert isinstance(b, shmarray.SharedArray) and np.shares_memory(a, b)


def test_to_another_or_unknown_host_the_bytes_go(key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    for recipient in (backend.host_identity() ^ 1, _transfer.UNKNOWN):
        with _transfer.sending(recipient):
            raw = pickle.dumps(a[2:5])
        b = pickle.loads(raw)
        assert type(b) is np.ndarray and b.tolist() == [2.0, 3.0, 4.0]
    with _transfer.sending(backend.host_identity()):
        assert isinstance(pickle.loads(pickle.dumps(a)), shmarray.SharedArray)


def test_deferred_attaches_nothing_and_forwards(key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    raw = pickle.dumps(a[1:3])
    code = f"""
import pickle, sys
from shmarray import _transfer, _attachment
from shmarray._os import backend
raw = {raw!r}
with _transfer.reading(_transfer.DEFER):
    d = pickle.loads(raw)
assert isinstance(d, _transfer.Deferred), d
assert not _attachment._BY_NAME, "a deferred reference attached"
assert pickle.dumps(d) == raw or len(pickle.dumps(d)) < 150
with _transfer.sending(backend.host_identity() ^ 1):
    out = pickle.dumps(d)
assert not _attachment._BY_NAME
v = pickle.loads(out)
assert type(v).__name__ == "ndarray" and v.tolist() == [1.0, 2.0], v
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_deferred_from_a_third_host_becomes_unreachable(key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    with _transfer.reading(_transfer.DEFER):
        d = pickle.loads(_forged(a, 12345))
    with _transfer.sending(backend.host_identity()):
        u = pickle.loads(pickle.dumps(d))
    assert isinstance(u, _transfer.Unreachable)
    with pytest.raises(shmarray.ShmError, match="nobody on the way"):
        np.sum(u)


def test_lenient_reading_never_raises(key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    raw = _forged(a, 12345)
    with pytest.raises(shmarray.ShmError, match="another host"):
        pickle.loads(raw)  # plain pickle: the error
    with _transfer.reading(_transfer.LENIENT):
        u = pickle.loads(raw)
        ok = pickle.loads(pickle.dumps(a))
    assert isinstance(ok, shmarray.SharedArray)
    assert isinstance(u, _transfer.Unreachable) and "another host" in repr(u)
    for use in (lambda: np.asarray(u), lambda: u + 1, lambda: u[0], lambda: len(u), lambda: u.sum()):
        with pytest.raises(shmarray.ShmError, match="cannot be used"):
            use()
    assert not hasattr(u, "__dask_graph__")  # dunder probes are plain AttributeErrors
    assert isinstance(pickle.loads(pickle.dumps(u)), _transfer.Unreachable)


def test_table_handle(key: str) -> None:
    t = shmarray.share_table(key, pa.table({"x": np.arange(100)}))
    h = shmarray.table_handle(t)
    assert h.key == key and not h.by_value
    assert shmarray.table_handle(key).key == key
    raw = pickle.dumps(h)
    assert len(raw) < 150
    again = pickle.loads(raw)
    assert shmarray.attach_table(again).equals(t)
    assert shmarray.attach_table(again, validate="full").num_rows == 100
    with _transfer.sending(backend.host_identity() ^ 1):
        by_value = pickle.loads(pickle.dumps(h))
    assert by_value.by_value and shmarray.attach_table(by_value).equals(t)
    with pytest.raises(TypeError, match="does not live in a shmarray segment"):
        shmarray.table_handle(pa.table({"x": [1]}))
    with pytest.raises(shmarray.NotFoundError):
        shmarray.table_handle(key + "-none")
    a = shmarray.share(key + "-arr", np.zeros(3))
    with pytest.raises(shmarray.HeaderError):
        shmarray.table_handle(key + "-arr")
    del a


def test_a_handle_keeps_its_segment(key: str) -> None:
    t = shmarray.share_table(key, pa.table({"x": np.arange(10)}))
    h = shmarray.table_handle(t)
    del t
    assert shmarray.attach_table(h).num_rows == 10
    del h
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach_table(key)


def test_importing_shmarray_imports_no_dask() -> None:
    code = "import sys, shmarray, shmarray._transfer; print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
