"""Task functions for tests/test_dask.py: workers import them (their PYTHONPATH has tests/)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def kind_and_sum(a: Any) -> tuple[str, float]:
    return type(a).__name__, float(np.asarray(a).sum())


def write_first(a: Any, value: float) -> str:
    a[0] = value
    return type(a).__name__


def read_at(a: Any, i: int) -> float:
    return float(a[i])


def start_method() -> str:
    import multiprocessing

    return str(multiprocessing.get_start_method(allow_none=True))


def share_ones(key: str, n: int) -> Any:
    import shmarray

    return shmarray.share(key, np.ones(n))


def share_table(key: str, n: int) -> Any:
    import pyarrow as pa

    import shmarray

    t = shmarray.share_table(key, pa.table({"x": np.arange(n)}))
    return shmarray.table_handle(t)


def table_facts(handle: Any) -> tuple[str, bool, int, int]:
    """(handle type, by value, rows, sum); reads the table through attach_table(handle)."""
    import pyarrow.compute as pc

    import shmarray

    t = shmarray.attach_table(handle)
    return type(handle).__name__, bool(handle.by_value), t.num_rows, int(pc.sum(t["x"]).as_py())


def segment_key(a: Any) -> Any:
    return a.key


def mapped_segments(prefix: str) -> list[str]:
    """Names of this process's mappings of /dev/shm files whose name contains *prefix*."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if "/dev/shm/" in line and prefix in line})


def attached_keys(prefix: str) -> list[str]:
    from shmarray import _attachment

    return sorted(name for (name, _mode) in list(_attachment._BY_NAME) if prefix in name)


def host() -> int:
    from shmarray._os import backend

    return backend.host_identity()


def pid() -> int:
    return os.getpid()


def sizeof_of_data(dask_worker: Any) -> dict[str, int]:
    from dask.sizeof import sizeof

    return {str(k): int(sizeof(v)) for k, v in dask_worker.data.items()}


def spill_and_read(key: str, dask_worker: Any = None) -> tuple[str, float, list[str]]:
    """Put a SharedArray into the worker's memory, spill it to disk, read it back."""
    import shmarray

    a = shmarray.share(key, np.arange(1000.0))
    dask_worker.data["spill-me"] = a
    del a
    dask_worker.data.evict()
    on_disk = [str(k) for k in dask_worker.data.slow]
    back = dask_worker.data["spill-me"]
    del dask_worker.data["spill-me"]
    return type(back).__name__, float(np.asarray(back).sum()), on_disk


class Forged:
    """Pickles as a reference to *a* that claims another host made it."""

    def __init__(self, a: Any, host: int) -> None:
        self.reduced = a.__reduce_ex__(5)
        self.host = host

    def __reduce__(self) -> Any:
        fn, (ref, detail) = self.reduced
        return fn, ((*ref[:3], self.host, *ref[4:]), detail)  # Reference: key, native, mode, host, ...
