"""The ways to put an ndarray into shared memory and to get it back out, shmarray's and its peers'.

Producers (``make``) run in the benchmark's own process and register their
segment for cleanup; consumers (``open_view`` and the ``*_in_worker``
functions) run in a warm worker process. Methods by hand get the array's
shape and dtype out of band, as a user writing them would pass them.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from typing import Any, Callable

import numpy as np

from .._harness import Cleanup, have, inherited, mem_available

SHMARRAY = "shmarray"
SEGMENT = "segment"
STDLIB = "stdlib"
POSIX = "posix_ipc"
SHAREDARRAY = "SharedArray"

Meta = tuple[tuple[int, ...], str]


def shmarray_missing() -> str | None:
    """Why shmarray's ndarray layer cannot be measured, None when it can."""
    import shmarray

    missing = [n for n in ("create", "share", "attach") if not hasattr(shmarray, n)]
    if missing:
        return f"shmarray.{'/'.join(missing)} not available in this checkout (shmarray/_array.py)"
    return None


def peer_missing(method: str) -> str | None:
    """Why a peer cannot be measured (not installed), None when it can."""
    if method == POSIX and not have("posix_ipc"):
        return "posix_ipc is not installed"
    if method == SHAREDARRAY and not have("SharedArray"):
        return "the SharedArray package is not installed (pip install 'shmarray-zerocopy[bench]')"
    if method in (SHMARRAY, SEGMENT):
        return shmarray_missing() if method == SHMARRAY else None
    return None


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:  # noqa: BLE001 - closing at the end of a measurement
        pass


class Made:
    """A producer's segment: ``release()`` drops this process's hold and removes the name."""

    def __init__(self, name: str, cleanup: Cleanup, label: str, undo: Callable[[], None],
                 hold: Any = None) -> None:
        self.name = name
        self._cleanup = cleanup
        self.hold = hold
        self._handle = cleanup.add(label, undo)

    def release(self) -> None:
        """Drop the hold and remove the segment now."""
        self.hold = None
        self._cleanup.done(self._handle)


def make(method: str, name: str, cleanup: Cleanup, src: np.ndarray | None, shape: tuple[int, ...],
         dtype: np.dtype[Any]) -> Made:
    """Create segment *name* holding *src* (or zeros of *shape*) the way *method* does."""
    if method == SHMARRAY:
        import shmarray

        if src is not None:
            arr = shmarray.share(name, src)
        else:
            arr = shmarray.create(name, shape, dtype)
        return Made(name, cleanup, f"shmarray {name}", lambda: _unlink_shmarray(arr, name), hold=arr)
    if method == SEGMENT:
        import shmarray

        nbytes = int(np.prod(shape)) * dtype.itemsize
        seg = shmarray.Segment(name).create(nbytes)
        if src is not None:
            np.frombuffer(seg.data, dtype)[:] = src.ravel()
        return Made(name, cleanup, f"segment {name}", seg.detach, hold=seg)
    if method == STDLIB:
        from multiprocessing import shared_memory

        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        if src is not None:
            np.ndarray(shape, dtype, buffer=shm.buf)[...] = src

        def undo() -> None:
            _close_quietly(shm)
            shm.unlink()

        return Made(name, cleanup, f"stdlib {name}", undo, hold=shm)
    if method == POSIX:
        import posix_ipc

        nbytes = int(np.prod(shape)) * dtype.itemsize
        m = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=nbytes)
        if src is not None:
            with mmap.mmap(m.fd, nbytes) as mm:
                np.frombuffer(mm, dtype).reshape(shape)[...] = src
        m.close_fd()
        return Made(name, cleanup, f"posix_ipc {name}", m.unlink)
    if method == SHAREDARRAY:
        import SharedArray as sa

        arr = sa.create(f"shm://{name}", shape, dtype)
        if src is not None:
            arr[...] = src
        del arr
        return Made(name, cleanup, f"SharedArray {name}", lambda: sa.delete(f"shm://{name}"))
    raise ValueError(f"unknown method {method!r}")  # pragma: no cover


def _unlink_shmarray(arr: Any, name: str) -> None:
    import shmarray

    close = getattr(arr, "close", None)
    if close is not None:
        close()
    try:
        shmarray.unlink(name)
    except shmarray.NotFoundError:
        pass


def open_view(method: str, name: str, meta: Meta) -> tuple[np.ndarray, Callable[[], None]]:
    """In a consumer: the ndarray over segment *name*, and what closes it (call after dropping the array)."""
    shape, dtype_str = meta
    if method == SHMARRAY:
        import shmarray

        arr = shmarray.attach(name)
        close = getattr(arr, "close", None)
        return arr, close if close is not None else (lambda: None)
    if method == SEGMENT:
        import shmarray

        seg = shmarray.Segment(name).attach()
        return np.frombuffer(seg.data, np.dtype(dtype_str)).reshape(shape), seg.detach
    if method == STDLIB:
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=name)
        return np.ndarray(shape, np.dtype(dtype_str), buffer=shm.buf), shm.close
    if method == POSIX:
        import posix_ipc

        m = posix_ipc.SharedMemory("/" + name)
        mm = mmap.mmap(m.fd, m.size)
        m.close_fd()
        return np.frombuffer(mm, np.dtype(dtype_str)).reshape(shape), lambda: None
    if method == SHAREDARRAY:
        import SharedArray as sa

        return sa.attach(f"shm://{name}"), lambda: None
    raise ValueError(f"unknown method {method!r}")  # pragma: no cover


# -- run in the worker ---------------------------------------------------------------------


def attach_in_worker(method: str, name: str, meta: Meta) -> float:
    """Seconds from name to ndarray (the array is dropped and closed afterwards, untimed)."""
    t0 = time.perf_counter()
    arr, close = open_view(method, name, meta)
    t1 = time.perf_counter()
    del arr
    close()
    return t1 - t0


def attach_sum_in_worker(method: str, name: str, meta: Meta) -> tuple[float, float]:
    """(sum, seconds) of attaching segment *name* and summing it."""
    t0 = time.perf_counter()
    arr, close = open_view(method, name, meta)
    total = float(arr.sum())
    del arr
    close()
    return total, time.perf_counter() - t0


def sum_in_worker(arr: Any) -> float:
    """The sum of an array that arrived pickled, as an argument."""
    return float(np.asarray(arr).sum())


def sum_from_queue_in_worker() -> float:
    """The sum of an array taken from the worker's inherited queue."""
    arr = inherited("queue").get(timeout=300)
    return float(arr.sum())


def sum_tensor_in_worker(t: Any) -> float:
    """The sum of a torch tensor that arrived through torch's shared-memory reduction."""
    total = float(t.numpy().sum())
    del t
    return total


def import_in_worker(*modules: str) -> None:
    """Warm a worker: import what its calls will need."""
    import importlib

    for m in modules:
        if have(m):
            importlib.import_module(m)


def close_enough(got: float, want: float) -> bool:
    """Sums of the same float64 data, allowing for a different summation order."""
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6)


def source_array(nbytes: int) -> np.ndarray:
    """The array a group shares: float64, distinct values, in private (already touched) memory."""
    return np.arange(nbytes // 8, dtype=np.float64)


def shm_tag_name(cleanup: Cleanup, what: str) -> str:
    """A /dev/shm file name of this run."""
    return os.path.join("/dev/shm", cleanup.name(what))


def big_size(res: Any, quick: bool, quick_size: int, copies: int) -> int:
    """512 MiB (*quick_size* in --quick), or 64 MiB, noted in *res*, when *copies* of it would not fit."""
    size = quick_size if quick else (512 << 20)
    if copies * size > mem_available():
        size = 64 << 20
        res.notes.append("Not enough free memory for 512 MiB: measured at 64 MiB.")
    return size


def start_ray(ray: Any, size: int) -> None:
    """ray.init for a group that puts objects of *size* bytes: 2 CPUs, room for four, no dashboard."""
    ray.init(num_cpus=2, object_store_memory=max(4 * size, 1 << 30), include_dashboard=False,
             log_to_driver=False, configure_logging=False)


def shut_down(pool: Any = None, client: Any = None, cluster: Any = None, ray: Any = None) -> None:
    """Stop the peers a group started (each may be None)."""
    if pool is not None:
        pool.terminate()
        pool.join()
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
    if ray is not None:
        ray.shutdown()
