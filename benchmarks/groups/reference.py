"""reference: unpickling a SharedArray reference, against a small ndarray's pickle and stdlib attach.

Everything runs in one warm worker process. Each sample times a batch of
operations and reports the time per operation:

- the reference of a 10-element view of a shared array, unpickled in a
  process that already holds the segment (the views are kept alive, as a
  dataset of per-sample views is), and the same dropped at once;
- the first unpickle in a process that does not hold the segment (it attaches);
- ``pickle.loads`` of an 8-element float64 ndarray's pickle (the issue's yardstick);
- stdlib ``SharedMemory(name)`` + ``np.ndarray`` and ``close()``, what a
  reference costs without one attachment per process.
"""

from __future__ import annotations

import gc
import pickle
import time
from typing import Any, Callable

import numpy as np

from .._harness import Context, GroupResult, Row, Worker, interleave

NAME = "reference"
TITLE = "Unpickle a reference: in a process that holds the segment, against pickle.loads and stdlib attach"

HELD_KEEP = "shmarray reference, process holds the segment (views kept)"
HELD_DROP = "shmarray reference, process holds the segment (each view dropped)"
FIRST = "shmarray reference, first in a process (attaches)"
PLAIN = "pickle.loads of an 8-element ndarray (kept)"
STDLIB = "stdlib SharedMemory(name) + np.ndarray + close"

_BATCH = 2000


def _setup_in_worker(key: str) -> tuple[bytes, bytes, str]:
    """In the worker: a shared array held here, its view's reference, a plain pickle, a stdlib segment."""
    import shmarray
    from multiprocessing import shared_memory

    global _HELD, _STD
    _HELD = shmarray.share(key, np.arange(4096.0))
    ref = pickle.dumps(_HELD[100:110])
    plain = pickle.dumps(np.arange(8.0))
    _STD = shared_memory.SharedMemory(create=True, size=4096 * 8)
    return ref, plain, _STD.name


_HELD: Any = None
_STD: Any = None


def _batch_in_worker(kind: str, payload: Any, n: int) -> float:
    """Seconds per operation over *n* operations of *kind*."""
    loads = pickle.loads
    if kind in (HELD_KEEP, PLAIN):
        # Both kept alive for the batch, so the collector sees the same number of new objects.
        keep = []
        t0 = time.perf_counter()
        for _ in range(n):
            keep.append(loads(payload))
        dt = time.perf_counter() - t0
        del keep
    elif kind == HELD_DROP:
        t0 = time.perf_counter()
        for _ in range(n):
            loads(payload)
        dt = time.perf_counter() - t0
    elif kind == STDLIB:
        from multiprocessing import shared_memory

        t0 = time.perf_counter()
        for _ in range(n):
            shm = shared_memory.SharedMemory(payload)
            a = np.ndarray((4096,), np.float64, buffer=shm.buf)
            del a
            shm.close()
        dt = time.perf_counter() - t0
    else:
        raise ValueError(kind)
    gc.collect()
    return dt / n


def _first_in_fresh_worker(ref: bytes) -> float:
    t0 = time.perf_counter()
    v = pickle.loads(ref)
    dt = time.perf_counter() - t0
    del v
    return dt


def _teardown_in_worker() -> None:
    global _HELD, _STD
    if _STD is not None:
        _STD.close()
        _STD.unlink()
        _STD = None
    if _HELD is not None:
        _HELD.close()
        _HELD = None


def run(ctx: Context) -> GroupResult:
    """Measure unpickling per operation, all in one worker, round-robin."""
    res = GroupResult(NAME, TITLE)
    reps = ctx.reps(15, 5)
    n = _BATCH if not ctx.quick else 500
    key = ctx.cleanup.name("ref")
    with Worker() as w:
        w.call(_import_in_worker)
        ref, plain, std_name = w.call(_setup_in_worker, key)
        try:
            payloads = {HELD_KEEP: ref, HELD_DROP: ref, PLAIN: plain, STDLIB: std_name}

            def one(kind: str) -> Callable[[], float]:
                return lambda: float(w.call(_batch_in_worker, kind, payloads[kind], n))

            samples, errors = interleave(ctx, {k: one(k) for k in payloads}, reps=reps, warmup=1)
            firsts = []
            for _ in range(ctx.reps(7, 3)):
                with Worker() as fresh:
                    fresh.call(_import_in_worker)
                    firsts.append(float(fresh.call(_first_in_fresh_worker, ref)))
            samples[FIRST] = firsts
        finally:
            w.call(_teardown_in_worker)
    for kind in (HELD_KEEP, HELD_DROP, FIRST, PLAIN, STDLIB):
        res.rows.append(Row(kind, samples.get(kind, []), role="shmarray" if kind.startswith("shmarray") else "peer",
                            error=errors.get(kind, "")))
    held, plain_t, std_t = res.median(HELD_KEEP), res.median(PLAIN), res.median(STDLIB)
    if held and plain_t:
        res.headline("unpickle a reference in a process that holds the segment: time / pickle.loads of a "
                     "small ndarray", held / plain_t, "<= 3", held / plain_t <= 3,
                     f"reference {held * 1e6:.1f} us, small ndarray {plain_t * 1e6:.1f} us")
    if held and std_t:
        res.headline("unpickle a reference (process holds it): stdlib SharedMemory(name) + ndarray time / ours",
                     std_t / held, "> 1", std_t / held > 1,
                     f"stdlib {std_t * 1e6:.1f} us, reference {held * 1e6:.1f} us")
    res.notes.append(
        f"Each sample is one batch of {n} operations in a warm worker, reported per operation; "
        "'kept' keeps every unpickled view (and every plain ndarray) alive for the batch, as a dataset "
        "of per-sample views does; the garbage collector runs as usual. "
        "'dropped' lets each go at once. 'first in a process' is one unpickle in a fresh worker "
        "that has imported shmarray: the attach that later references then share.")
    return res


def _import_in_worker() -> None:
    import multiprocessing.shared_memory  # noqa: F401

    import shmarray  # noqa: F401
