"""cluster: shmarray.dask and Ray on one host, against their own transfers and a process pool.

512 MiB float64 (64 MiB in --quick), medians of interleaved samples:

- hand-off: a plain ndarray here -> a warm worker's sum back here.
  ``shmarray.share`` + a ``multiprocessing.Pool`` task (the yardstick);
  ``shmarray.share`` + ``client.submit`` on a LocalCluster of 2 worker
  processes after ``shmarray.dask.register`` (the SharedArray travels by
  reference); Dask's own ``client.scatter`` + ``submit`` (the bytes over TCP);
- worker to worker: a task on worker A made a 512 MiB result (outside the
  clock); the clock covers a task on worker B that sums it. The result is a
  SharedArray (by reference) or a plain ndarray (Dask's default: B fetches
  the bytes from A);
- Ray (when installed): ``shmarray.share`` + a task given the SharedArray,
  against ``ray.put`` + a task; plus facts seen in the same run: what type
  the task receives, whether it can write, and what a reference from
  another host does to the task and the node.

Dask and Ray are measured when installed and skipped with a note otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .._harness import MP, Context, GroupResult, Row, have, interleave
from . import _peers as P
from .pool import _noop, _unlink

NAME = "cluster"
TITLE = "On a cluster: shmarray.dask and Ray against their own transfers"

POOL = "shmarray.share + Pool task"
DASK_SHM = "shmarray.share + Dask submit (shmarray.dask)"
DASK_SCATTER = "Dask scatter + submit"
W2W_SHM = "worker to worker, SharedArray result, B sums it (shmarray.dask)"
W2W_DASK = "worker to worker, ndarray result, B sums it (Dask default)"
MOVE_SHM = "worker to worker, SharedArray result, B touches each page (shmarray.dask)"
MOVE_DASK = "worker to worker, ndarray result, B touches each page (Dask default)"
DASK_FLOOR = "Dask submit of a task given an int (Dask's floor)"
RAY_SHM = "shmarray.share + Ray task"
RAY_PUT = "Ray ray.put + task"


def array_sum(a: Any) -> float:
    """The worker's task: the sum of the array it was given."""
    return float(np.asarray(a).sum())


def touch_pages(a: Any) -> float:
    """The worker's task when only the move is timed: read one float64 of every 4 KiB page."""
    return float(np.asarray(a).reshape(-1)[::512].sum())


def make_result(n: int, key: str | None) -> Any:
    """A task's result of n float64: a SharedArray under *key*, or a plain ndarray."""
    a = np.arange(n, dtype=np.float64)
    if key is None:
        return a
    import shmarray

    return shmarray.share(key, a)


def write_and_tell(a: Any) -> tuple[str, bool]:
    """What a Ray task receives, and whether writing it works (and is seen by the caller)."""
    try:
        a[0] = -1.0
        return type(a).__name__, True
    except (ValueError, TypeError):
        return type(a).__name__, False


def run(ctx: Context) -> GroupResult:
    """Hand-offs and worker-to-worker transfers through Dask and Ray, with and without shmarray."""
    import shmarray
    from shmarray._reuse import idle_maps

    res = GroupResult(NAME, TITLE)
    size = P.big_size(res, ctx.quick, 64 << 20, copies=8)
    src = P.source_array(size)
    want = float(src.sum())
    variant = f"{size >> 20} MiB float64"
    w_variant = f"{size >> 20} MiB float64 result"
    reps = ctx.reps(9, 3)
    pool = MP.Pool(1)
    client: Any = None
    cluster: Any = None
    ray_mod: Any = None
    methods: dict[str, Callable[[], float]] = {}
    w_methods: dict[str, Callable[[], float]] = {}
    ray_methods: dict[str, Callable[[], float]] = {}
    idle_maps.set_budget(None)

    def check(got: float, label: str) -> None:
        if not P.close_enough(got, want):
            raise RuntimeError(f"{label}: the worker summed {got!r}, expected {want!r}")

    def shared(run_task: Callable[[Any], float], label: str) -> float:
        key = ctx.cleanup.name("cl")
        h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
        try:
            t0 = time.perf_counter()
            a = shmarray.share(key, src)
            got = run_task(a)
            t1 = time.perf_counter()
            del a
            pool.apply(_noop, (0,))  # the pool's handler thread drops the last arguments
        finally:
            ctx.cleanup.done(h)
        check(got, label)
        return t1 - t0

    try:
        pool.map(_noop, range(2))
        methods[POOL] = lambda: shared(lambda a: pool.apply(array_sum, (a,)), POOL)

        if have("distributed"):
            import shmarray.dask
            from distributed import Client, LocalCluster, wait

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=None, memory_limit=0)
            client = Client(cluster)
            shmarray.dask.register(client)
            a_worker, b_worker = sorted(client.scheduler_info()["workers"])
            client.submit(array_sum, src[:1000]).result()

            methods[DASK_SHM] = lambda: shared(
                lambda a: client.submit(array_sum, a, workers=[a_worker]).result(), DASK_SHM)

            def by_scatter() -> float:
                t0 = time.perf_counter()
                fut = client.scatter(src, direct=True, workers=[a_worker])
                got = client.submit(array_sum, fut, workers=[a_worker]).result()
                t1 = time.perf_counter()
                del fut
                check(got, DASK_SCATTER)
                return t1 - t0

            methods[DASK_SCATTER] = by_scatter

            def dask_floor() -> float:
                t0 = time.perf_counter()
                client.submit(_identity, 1, workers=[a_worker], pure=False).result()
                return time.perf_counter() - t0

            methods[DASK_FLOOR] = dask_floor

            def worker_to_worker(shared_result: bool, task: Callable[[Any], float] = array_sum) -> float:
                key = ctx.cleanup.name("cw") if shared_result else None
                h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key)) if key else None
                try:
                    made = client.submit(make_result, size // 8, key, workers=[a_worker], pure=False)
                    wait(made)
                    t0 = time.perf_counter()
                    got = client.submit(task, made, workers=[b_worker], pure=False).result()
                    t1 = time.perf_counter()
                    made.release()
                    del made
                finally:
                    if h is not None:
                        ctx.cleanup.done(h, run=False)
                if task is array_sum:
                    check(got, W2W_SHM if shared_result else W2W_DASK)
                elif not P.close_enough(got, touched):
                    raise RuntimeError(f"worker B read {got!r} from every page, expected {touched!r}")
                return t1 - t0

            touched = float(src[::512].sum())
            w_methods[W2W_SHM] = lambda: worker_to_worker(True)
            w_methods[W2W_DASK] = lambda: worker_to_worker(False)
            w_methods[MOVE_SHM] = lambda: worker_to_worker(True, touch_pages)
            w_methods[MOVE_DASK] = lambda: worker_to_worker(False, touch_pages)
        else:
            res.skipped.append("Dask: dask[distributed] is not installed (pip install 'shmarray-zerocopy[dask]')")

        if have("ray"):
            import ray

            ray_mod = ray
            P.start_ray(ray, size)
            r_sum = ray.remote(array_sum)
            ray.get(r_sum.remote(ray.put(src[:1000])))

            def by_put() -> float:
                t0 = time.perf_counter()
                ref = ray.put(src)
                got = ray.get(r_sum.remote(ref))
                t1 = time.perf_counter()
                del ref
                check(got, RAY_PUT)
                return t1 - t0

            ray_methods[RAY_SHM] = lambda: shared(lambda a: ray.get(r_sum.remote(a)), RAY_SHM)
            ray_methods[RAY_PUT] = by_put
            res.notes.extend(_ray_facts(ray, ctx))
        else:
            res.skipped.append("Ray: ray is not installed (pip install ray; not a test dependency)")

        ctx.log(f"  {variant}: {len(methods)} hand-off methods x {reps}")
        samples, errors = interleave(ctx, {**methods, **ray_methods}, reps=reps, warmup=1)
        ctx.log(f"  {w_variant}: {len(w_methods)} worker-to-worker methods x {reps}")
        w_samples, w_errors = interleave(ctx, w_methods, reps=reps, warmup=1)
    finally:
        P.shut_down(pool, client, cluster, ray_mod)
    roles = {POOL: "shmarray", DASK_SHM: "shmarray", W2W_SHM: "shmarray", MOVE_SHM: "shmarray",
             RAY_SHM: "shmarray"}
    for label in {**methods, **ray_methods}:
        res.rows.append(Row(label, samples[label], variant=variant, role=roles.get(label, "peer"),
                            error=errors.get(label, "")))
    for label in w_methods:
        res.rows.append(Row(label, w_samples[label], variant=w_variant, role=roles.get(label, "peer"),
                            error=w_errors.get(label, "")))
    res.notes.append(
        "Each hand-off sample: a plain ndarray here -> the worker's sum back here, a new key every time. "
        "One spawn Pool worker; Dask a LocalCluster of 2 worker processes (memory_limit=0) after "
        "shmarray.dask.register; Ray with num_cpus=2. Worker to worker: the result was made on worker A "
        "before the clock; the clock covers the task on worker B that sums it.")
    pool_t, dask_t, scatter_t = (res.median(m, variant=variant) for m in (POOL, DASK_SHM, DASK_SCATTER))
    if pool_t and dask_t:
        res.headline("Dask same host: shmarray.dask submit / share + Pool task", dask_t / pool_t, "<= 1.2",
                     dask_t / pool_t <= 1.2, f"{variant}: {dask_t * 1e3:.0f} ms vs Pool {pool_t * 1e3:.0f} ms")
    if dask_t and scatter_t:
        res.headline("Dask same host: scatter+submit / shmarray.dask submit", scatter_t / dask_t, ">= 5",
                     scatter_t / dask_t >= 5, f"{variant}: scatter {scatter_t * 1e3:.0f} ms vs "
                     f"shmarray {dask_t * 1e3:.0f} ms")
    ours_m, theirs_m = res.median(MOVE_SHM, variant=w_variant), res.median(MOVE_DASK, variant=w_variant)
    if ours_m and theirs_m:
        res.headline("worker to worker, the move (each page read once): Dask default / SharedArray result",
                     theirs_m / ours_m, ">= 10", theirs_m / ours_m >= 10,
                     f"{w_variant}: Dask {theirs_m * 1e3:.0f} ms vs shmarray {ours_m * 1e3:.0f} ms")
    ours_w, theirs_w = res.median(W2W_SHM, variant=w_variant), res.median(W2W_DASK, variant=w_variant)
    if ours_w and theirs_w:
        res.headline("worker to worker, move + a sum on B: Dask default / SharedArray result", theirs_w / ours_w,
                     "(no aim)", None, f"{w_variant}: Dask {theirs_w * 1e3:.0f} ms vs "
                     f"shmarray {ours_w * 1e3:.0f} ms")
    floor = res.median(DASK_FLOOR, variant=variant)
    if floor and dask_t and pool_t:
        res.notes.append(f"Dask's own round trip here (submit of a task given an int, result back): "
                         f"{floor * 1e3:.1f} ms, {floor / pool_t:.0%} of the Pool hand-off.")
    ray_ours, ray_theirs = res.median(RAY_SHM, variant=variant), res.median(RAY_PUT, variant=variant)
    if ray_ours and ray_theirs:
        res.headline("Ray same node: ray.put+task / shmarray.share + Ray task", ray_theirs / ray_ours, ">= 1",
                     ray_theirs >= ray_ours, f"{variant}: Ray {ray_theirs * 1e3:.0f} ms vs "
                     f"shmarray {ray_ours * 1e3:.0f} ms")
    return res


def _ray_facts(ray: Any, ctx: Context) -> list[str]:
    """What a Ray task sees of a SharedArray, and what a reference from another host does (observed now)."""
    import shmarray

    notes = []
    key = ctx.cleanup.name("cr")
    h = ctx.cleanup.add(f"shmarray {key}", lambda: _unlink(key))
    try:
        a = shmarray.share(key, np.zeros(1000))
        kind, wrote = ray.get(ray.remote(write_and_tell).remote(a))
        notes.append(f"Ray task given a SharedArray received a {kind}; writing it "
                     f"{'worked and the caller saw ' + str(a[0]) if wrote else 'failed'}.")
        kind, wrote = ray.get(ray.remote(write_and_tell).remote(ray.put(np.zeros(1000))))
        notes.append(f"Ray task given ray.put(ndarray) received a {kind}; writing it "
                     f"{'worked' if wrote else 'raised (Ray objects are read-only)'}.")
        fn, args = a.__reduce_ex__(5)
        # As a reference made on another node arrives: Ray unpickles the task's argument.
        forged = _Forged(fn, (*args[:6], 12345, args[7]))
        pid = ray.get(ray.remote(_pid).remote())
        try:
            ray.get(ray.remote(array_sum).remote(forged))
            notes.append("A reference from another host: the Ray task did not fail (unexpected).")
        except Exception as e:  # noqa: BLE001 - what Ray reports is the observation
            first = str(e).strip().splitlines()[-1][:400]
            notes.append(f"A reference from another host: the Ray task failed with {type(e).__name__} "
                         f"({first}); a task on the same node afterwards ran "
                         f"(worker pid {ray.get(ray.remote(_pid).remote())}, before {pid}).")
        del a
    finally:
        ctx.cleanup.done(h)
    return notes


class _Forged:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


def _identity(x: Any) -> Any:
    return x


def _pid() -> int:
    import os

    return os.getpid()
