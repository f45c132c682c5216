"""handoff: the pipeline pattern, one array (or table) after another to a warm worker.

Each sample starts with a plain ndarray (or pa.Table) in this process and
ends when a warm worker's answer (the array's sum, or a column's sum of the
table) is back here. The producer hands over a new array every time, under
a new key, and drops it once the answer is back, as a pipeline does; so
from the second sample on, shmarray's recycled memory is warm (``_reuse.kept_files``,
``_reuse.idle_maps``), and so is Ray's object store.

Methods:

- ``shmarray.share`` + a ``multiprocessing.Pool`` task given the SharedArray
  (it travels by reference), with memory reuse on (the default) and off
  (``SHMARRAY_REUSE_BYTES=0``: fresh pages every time, as before reuse);
- the floor: ``np.copyto`` into one segment made once (by ``share``, so its
  data is placed for fast copies) and kept mapped, then the same task (the
  worker attaches it each time);
- Ray: ``ray.put`` + a task that sums it (``ray.get``);
- Dask: ``client.scatter`` + ``client.submit`` on a LocalCluster worker process;
- tables: ``share_table`` + a Pool task that ``attach_table``\\s it, against
  ``ray.put`` + a task.

Ray and Dask are measured when installed (they are not test dependencies;
Ray is large) and skipped with a note otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .._harness import MP, Context, GroupResult, Row, have, interleave
from . import _peers as P
from .pool import _noop, _unlink

NAME = "handoff"
TITLE = "Hand-off: a new array each time to a warm worker that sums it"

REUSE = "shmarray.share + Pool task (reuse on)"
NOREUSE = "shmarray.share + Pool task (reuse off)"
FLOOR = "floor: np.copyto into a reused, mapped segment + the same task"
ALLOC = "shmarray.allocating() array: share (no copy) + Pool task"
ALLOC_SHARE = "share() alone of an allocating() array"
OWN_SUM = "the worker's own sum of a warm array (Pool task)"
RAY = "Ray ray.put + task"
DASK = "Dask scatter + submit"
T_REUSE = "shmarray.share_table + Pool task attach_table (reuse on)"
T_RAY = "Ray ray.put(table) + task"


def array_sum(a: Any) -> float:
    """The worker's task: the sum of the array it was given."""
    return float(np.asarray(a).sum())


def table_sum(key: str) -> tuple[int, float]:
    """The worker's task for tables: attach, read a column, answer."""
    import pyarrow.compute as pc

    import shmarray

    t = shmarray.attach_table(key)
    return t.num_rows, float(pc.sum(t.column("px")).as_py())


def _table(rows: int) -> Any:
    import pyarrow as pa

    rng = np.random.default_rng(5)
    return pa.table({
        "id": np.arange(rows, dtype=np.int64),
        "px": rng.random(rows),
        "sym": pa.array(np.array(["AAPL", "MSFT", "GOOG", "AMZN", "NVDA"])[rng.integers(0, 5, rows)]),
    })


def run(ctx: Context) -> GroupResult:
    """Measure every way of handing an array, then a table, to one warm worker."""
    import shmarray
    from shmarray._reuse import idle_maps

    res = GroupResult(NAME, TITLE)
    size = P.big_size(res, ctx.quick, 32 << 20, copies=6)
    rows = 200_000 if ctx.quick else 5_000_000
    src = P.source_array(size)
    want = float(src.sum())
    variant = f"{size >> 20} MiB float64"
    t_variant = f"{rows:,} rows (int64, float64, string)"
    missing = P.shmarray_missing()
    pool = MP.Pool(1)
    floor_key = ctx.cleanup.name("hfloor")
    floor_h = ctx.cleanup.add(f"shmarray {floor_key}", lambda: _unlink(floor_key))
    ray_mod: Any = None
    client: Any = None
    cluster: Any = None
    methods: dict[str, Callable[[], float]] = {}
    t_methods: dict[str, Callable[[], float]] = {}
    roles = {REUSE: "shmarray", NOREUSE: "shmarray", FLOOR: "floor", T_REUSE: "shmarray", ALLOC: "shmarray",
             OWN_SUM: "floor"}
    try:
        pool.map(_noop, range(2))

        def check(got: float, label: str) -> None:
            if not P.close_enough(got, want):
                raise RuntimeError(f"{label}: the worker summed {got!r}, expected {want!r}")

        def share_task(label: str) -> float:
            got, took = _one_handoff(ctx, pool, lambda key: shmarray.share(key, src), array_sum, True)
            check(got, label)
            return took

        def reuse_on() -> float:
            idle_maps.set_budget(None)
            return share_task(REUSE)

        def reuse_off() -> float:
            idle_maps.set_budget(0)
            try:
                return share_task(NOREUSE)
            finally:
                idle_maps.set_budget(None)

        # Made by share(), so its data sits where a copy from src runs at full speed
        # (a create()d segment's data starts 192 bytes into a page: ~3x slower copies here).
        floor_arr = shmarray.share(floor_key, src)

        def floor() -> float:
            t0 = time.perf_counter()
            np.copyto(floor_arr, src)
            got = pool.apply(array_sum, (floor_arr,))
            t1 = time.perf_counter()
            check(got, FLOOR)
            return t1 - t0

        share_times: list[float] = []

        def allocated() -> float:
            # The producer computes into an allocating() array (outside the clock: its own work);
            # the hand-off is share (which publishes the array's file) + the task.
            key = ctx.cleanup.name("ha")
            h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
            try:
                with shmarray.allocating():
                    a = np.empty_like(src)
                np.copyto(a, src)
                t0 = time.perf_counter()
                s = shmarray.share(key, a)
                t1 = time.perf_counter()
                got = pool.apply(array_sum, (s,))
                t2 = time.perf_counter()
                del s, a
                pool.apply(_noop, (0,))
            finally:
                ctx.cleanup.done(h)
            check(got, ALLOC)
            share_times.append(t1 - t0)
            return t2 - t0

        pool.apply(_warm_array, (size,))

        def own_sum() -> float:
            t0 = time.perf_counter()
            got = pool.apply(_sum_warm, ())
            t1 = time.perf_counter()
            if got != float(size // 8):
                raise RuntimeError(f"{OWN_SUM}: the worker summed {got!r}")
            return t1 - t0

        if missing is None:
            methods[REUSE] = reuse_on
            methods[NOREUSE] = reuse_off
            methods[FLOOR] = floor
            methods[ALLOC] = allocated
        methods[OWN_SUM] = own_sum

        if have("ray"):
            import ray

            ray_mod = ray
            P.start_ray(ray, size)
            ray_sum = ray.remote(array_sum)
            ray.get(ray_sum.remote(ray.put(src[:1000])))

            def by_ray() -> float:
                got, took = _one_ray(ray, src, ray_sum)
                check(got, RAY)
                return took

            methods[RAY] = by_ray
        else:
            res.skipped.append(f"{RAY}: ray is not installed (pip install ray; not a test dependency)")

        if have("distributed"):
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                   dashboard_address=None, memory_limit=0)
            client = Client(cluster)
            client.submit(array_sum, src[:1000]).result()

            def by_dask() -> float:
                t0 = time.perf_counter()
                fut = client.scatter(src, direct=True)
                got = client.submit(array_sum, fut).result()
                t1 = time.perf_counter()
                del fut
                check(got, DASK)
                return t1 - t0

            methods[DASK] = by_dask
        else:
            res.skipped.append(f"{DASK}: dask[distributed] is not installed (pip install 'dask[distributed]')")

        reps = ctx.reps(9, 3)
        ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
        del floor_arr
        ctx.cleanup.done(floor_h)

        # -- tables ----------------------------------------------------------------------
        table = _table(rows)
        t_want = (table.num_rows, float(__import__("pyarrow.compute").compute.sum(table.column("px")).as_py()))

        def t_check(got: tuple[int, float], label: str) -> None:
            if got[0] != t_want[0] or not P.close_enough(got[1], t_want[1]):
                raise RuntimeError(f"{label}: the worker answered {got!r}, expected {t_want!r}")

        def t_share() -> float:
            got, took = _one_handoff(ctx, pool, lambda key: shmarray.share_table(key, table), table_sum, False)
            t_check(got, T_REUSE)
            return took

        if missing is None:
            t_methods[T_REUSE] = t_share
        if ray_mod is not None:
            def ray_table_sum(t: Any) -> tuple[int, float]:
                import pyarrow.compute as pc

                return t.num_rows, float(pc.sum(t.column("px")).as_py())

            r_tsum = ray_mod.remote(ray_table_sum)

            def t_ray() -> float:
                got, took = _one_ray(ray_mod, table, r_tsum)
                t_check(got, T_RAY)
                return took

            t_methods[T_RAY] = t_ray
        ctx.log(f"  {t_variant}: {len(t_methods)} methods x {reps}")
        t_samples, t_errors = interleave(ctx, t_methods, reps=reps, warmup=1)
    finally:
        P.shut_down(pool, client, cluster, ray_mod)
        idle_maps.set_budget(None)
        ctx.cleanup.done(floor_h)
    for label in methods:
        res.rows.append(Row(label, samples[label], variant=variant, role=roles.get(label, "peer"),
                            error=errors.get(label, "")))
    if share_times:
        res.rows.append(Row(ALLOC_SHARE, share_times[1:] or share_times, variant=variant, role="shmarray"))
    for label in t_methods:
        res.rows.append(Row(label, t_samples[label], variant=t_variant, role=roles.get(label, "peer"),
                            error=t_errors.get(label, "")))
    res.notes.append(
        "Each sample: a plain ndarray (or pa.Table) here -> a warm worker's answer back here, a new key "
        "every time, dropped after the answer. One spawn Pool worker; Ray with num_cpus=2; Dask a "
        "LocalCluster of one worker process.")
    ours = res.median(REUSE, variant=variant)
    for peer, aim, target in ((RAY, "hand-off: Ray put+task time / shmarray share+task time", ">= 1"),
                              (FLOOR, "hand-off: floor time / shmarray share+task time", ">= 0.77"),
                              (NOREUSE, "hand-off: reuse off / reuse on", "> 1"),
                              (DASK, "hand-off: Dask scatter+submit / shmarray share+task", "> 1")):
        theirs = res.median(peer, variant=variant)
        if ours is not None and theirs is not None:
            ratio = theirs / ours
            limit = 1 / 1.3 if peer == FLOOR else 1.0
            ok = ratio >= limit if peer in (RAY, FLOOR) else ratio > 1
            res.headline(aim, ratio, target, ok,
                         f"{variant}: shmarray {ours * 1e3:.0f} ms vs {peer} {theirs * 1e3:.0f} ms")
    alloc, own, alone = (res.median(x, variant=variant) for x in (ALLOC, OWN_SUM, ALLOC_SHARE))
    if alone is not None:
        res.headline("share() of an allocating() array", alone * 1e3, "< 1 ms", alone < 1e-3,
                     f"{variant}: {alone * 1e3:.3f} ms", unit="ms")
    if alloc is not None and own is not None:
        res.headline("hand-off of an allocating() array / the worker's own sum", alloc / own, "<= 1.15",
                     alloc / own <= 1.15, f"{variant}: {alloc * 1e3:.0f} ms vs {own * 1e3:.0f} ms")
    ray = res.median(RAY, variant=variant)
    if alloc is not None and ray is not None:
        res.headline("hand-off of an allocating() array / Ray put+task", alloc / ray, "<= 0.6",
                     alloc / ray <= 0.6, f"{variant}: {alloc * 1e3:.0f} ms vs Ray {ray * 1e3:.0f} ms")
    t_ours, t_theirs = res.median(T_REUSE, variant=t_variant), res.median(T_RAY, variant=t_variant)
    if t_ours is not None and t_theirs is not None:
        res.headline("table hand-off: Ray put+task / shmarray share_table+attach_table", t_theirs / t_ours,
                     ">= 1", t_theirs >= t_ours,
                     f"{t_variant}: shmarray {t_ours * 1e3:.0f} ms vs Ray {t_theirs * 1e3:.0f} ms")
    return res


_WARM: Any = None


def _warm_array(size: int) -> None:
    """In the worker: an array of ones of *size* bytes, kept (its pages warm)."""
    global _WARM
    _WARM = np.ones(size // 8)


def _sum_warm() -> float:
    return float(_WARM.sum())


def _one_ray(ray: Any, obj: Any, remote: Any) -> tuple[Any, float]:
    """ray.put(obj) and a task on it: (answer, seconds)."""
    t0 = time.perf_counter()
    ref = ray.put(obj)
    got = ray.get(remote.remote(ref))
    t1 = time.perf_counter()
    del ref
    return got, t1 - t0


def _one_handoff(ctx: Context, pool: Any, make: Callable[[str], Any], task: Callable[..., Any],
                 by_object: bool) -> tuple[Any, float]:
    """Share under a new key, run *task* on it (given the object, or its key), drop it: (answer, seconds)."""
    key = ctx.cleanup.name("ho")
    h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
    try:
        t0 = time.perf_counter()
        obj = make(key)
        got = pool.apply(task, (obj if by_object else key,))
        t1 = time.perf_counter()
        del obj
        # Pool's task-handler thread holds the last task's arguments until the
        # next task: flush it (outside the clock) so the array goes now, as it
        # would in a pipeline that drops each array once its answer is back.
        pool.apply(_noop, (0,))
    finally:
        ctx.cleanup.done(h)
    return got, t1 - t0
