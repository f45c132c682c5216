"""pool: a realistic job, 4 tasks over a 512 MiB array through a process pool.

Each task sums a quarter of the array. The pools (one worker per core,
spawn) are started and warmed before the timing. Three ways to hand the
quarters over, each through ``multiprocessing.Pool.map`` and
``concurrent.futures.ProcessPoolExecutor.map``:

- slices of a SharedArray that already lives in shared memory (pickled by
  reference: the task attaches);
- the same, with ``shmarray.share`` of the private array inside the timing;
- slices of the plain ndarray (pickled by value: every byte goes through a pipe).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable

from .._harness import MP, Context, GroupResult, Row, interleave
from . import _peers as P

NAME = "pool"
TITLE = "Pool: 4 tasks over one array through a process pool"
TASKS = 4
Mapper = Callable[[list[Any]], list[float]]


def chunk_sum(a: Any) -> float:
    """One task: the sum of its chunk."""
    import numpy as np

    return float(np.asarray(a).sum())


def _noop(x: int) -> int:
    import numpy  # noqa: F401 - warm the worker's imports
    import shmarray  # noqa: F401

    return x


def run(ctx: Context) -> GroupResult:
    """Measure the job both ways through both pools."""
    import shmarray

    res = GroupResult(NAME, TITLE)
    size = P.big_size(res, ctx.quick, 32 << 20, copies=4)
    workers = max(1, min(TASKS, os.cpu_count() or 1))
    src = P.source_array(size)
    want = float(src.sum())
    q = src.size // TASKS
    variant = f"{size >> 20} MiB, {TASKS} tasks, {workers} workers"
    missing = P.shmarray_missing()

    def check(parts: list[float], label: str) -> None:
        if not P.close_enough(sum(parts), want):
            raise RuntimeError(f"{label}: the tasks summed {sum(parts)!r}, expected {want!r}")

    def chunks(a: Any) -> list[Any]:
        return [a[i * q:(i + 1) * q] for i in range(TASKS)]

    pool = MP.Pool(workers)
    ex = concurrent.futures.ProcessPoolExecutor(workers, mp_context=MP)
    shared: Any = None
    shared_key = ctx.cleanup.name("pool")
    h = None
    try:
        pool.map(_noop, range(2 * workers))
        list(ex.map(_noop, range(2 * workers)))
        if missing is None:
            shared = shmarray.share(shared_key, src)
            h = ctx.cleanup.add(f"shmarray {shared_key}", lambda: P._unlink_shmarray(shared, shared_key))

        def mapper(kind: str) -> Mapper:
            if kind == "Pool":
                return lambda parts: pool.map(chunk_sum, parts)
            return lambda parts: list(ex.map(chunk_sum, parts))

        methods: dict[str, Callable[[], float]] = {}
        roles: dict[str, str] = {}
        for kind in ("Pool", "ProcessPoolExecutor"):
            run_map = mapper(kind)

            def by_ref(run_map: Mapper = run_map, kind: str = kind) -> float:
                t0 = time.perf_counter()
                parts = run_map(chunks(shared))
                t1 = time.perf_counter()
                check(parts, f"{kind} SharedArray")
                return t1 - t0

            def share_then_ref(run_map: Mapper = run_map, kind: str = kind) -> float:
                key = ctx.cleanup.name("poolsh")
                hh = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
                try:
                    t0 = time.perf_counter()
                    a = shmarray.share(key, src)
                    parts = run_map(chunks(a))
                    t1 = time.perf_counter()
                    del a
                finally:
                    ctx.cleanup.done(hh)
                check(parts, f"{kind} share")
                return t1 - t0

            def pickled(run_map: Mapper = run_map, kind: str = kind) -> float:
                t0 = time.perf_counter()
                parts = run_map(chunks(src))
                t1 = time.perf_counter()
                check(parts, f"{kind} ndarray")
                return t1 - t0

            if missing is None:
                methods[f"{kind}: SharedArray slices (by reference)"] = by_ref
                methods[f"{kind}: shmarray.share + slices (by reference)"] = share_then_ref
                roles[f"{kind}: SharedArray slices (by reference)"] = "shmarray"
                roles[f"{kind}: shmarray.share + slices (by reference)"] = "shmarray"
            methods[f"{kind}: ndarray slices (pickled)"] = pickled
        reps = ctx.reps(9, 3)
        ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    finally:
        pool.terminate()
        pool.join()
        ex.shutdown(wait=True, cancel_futures=True)
        shared = None
        if h is not None:
            ctx.cleanup.done(h)
    if missing is not None:
        res.rows.append(Row("SharedArray slices (by reference)", [], variant=variant, role="shmarray",
                            error=missing))
    for label in methods:
        res.rows.append(Row(label, samples[label], variant=variant, role=roles.get(label, "peer"),
                            error=errors.get(label, "")))
    res.notes.append(
        f"{TASKS} tasks, each the sum of a quarter; pools of {workers} spawn workers (one per core), "
        "started and warmed before timing. By reference, a task receives the key and attaches."
    )
    for kind in ("Pool", "ProcessPoolExecutor"):
        a = res.median(f"{kind}: SharedArray slices (by reference)", variant=variant)
        b = res.median(f"{kind}: ndarray slices (pickled)", variant=variant)
        if a is not None and b is not None:
            res.headline(f"pool ({kind}): pickled ndarray time / SharedArray time", b / a, "> 1", b > a,
                         f"{variant}: SharedArray {a * 1e3:.0f} ms vs pickled {b * 1e3:.0f} ms")
    return res


def _unlink(key: str) -> None:
    import shmarray

    try:
        shmarray.unlink(key)
    except shmarray.NotFoundError:
        pass
