"""lock: the segment lock against the locks a user would pick instead.

Two figures per lock, in ns:
- uncontended: one lock + unlock round trip in a tight loop in this process;
- contended: two processes each increment a counter in shared memory n
  times under the lock; ns per increment = (last end - first start) / 2n.
  The counter is checked afterwards: a lock that lets an update through
  unprotected is reported as failed, not timed.

Both figures interleave the locks: every lock's processes start first, and
the rounds rotate through the locks (``interleave``), so a slow spell of
the shared machine is spread over all of them.

Kernel-released locks are dropped by the kernel when their holder dies
(flock, OFD byte locks, SysV semaphores with SEM_UNDO, shmarray's lock);
futex semaphores (multiprocessing.Lock, posix_ipc) stay taken, and the
next acquirer hangs. Every figure includes the Python loop and call
overhead, shown by the floor row.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from typing import Any, Callable

from .._harness import MP, Context, GroupResult, Row, have, interleave

NAME = "lock"
TITLE = "Lock round trip (uncontended) and 2-process contended counter"

SHMARRAY_EX = "shmarray lock()/unlock() exclusive"
SHMARRAY_SH = "shmarray lock(shared=True)/unlock()"
SHMARRAY_CTX = "shmarray with seg.locked()"
MP_LOCK = "multiprocessing.Lock"
POSIX = "posix_ipc.Semaphore"
SYSV = "sysv_ipc.Semaphore (SEM_UNDO)"
FLOCK = "fcntl.flock"
OFD = "fcntl OFD byte lock"
FLOOR = "floor: loop + 2 empty C calls"

KERNEL_RELEASED = {SHMARRAY_EX: True, SHMARRAY_SH: True, SHMARRAY_CTX: True, MP_LOCK: False,
                   POSIX: False, SYSV: True, FLOCK: True, OFD: True}

_FLOCK_STRUCT = struct.Struct("@hhqqi4x")
_OFD_WR = _FLOCK_STRUCT.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
_OFD_UN = _FLOCK_STRUCT.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)


# -- the loops (shared by the uncontended and the contended figures) ------------------------


def _loop_calls(acq: Callable[[], Any], rel: Callable[[], Any], n: int, counter: Any) -> tuple[int, int]:
    t0 = time.perf_counter_ns()
    if counter is None:
        for _ in range(n):
            acq()
            rel()
    else:
        for _ in range(n):
            acq()
            counter[0] += 1
            rel()
    return t0, time.perf_counter_ns()


def _loop_shared(seg: Any, n: int) -> tuple[int, int]:
    lk = seg.lock
    ul = seg.unlock
    t0 = time.perf_counter_ns()
    for _ in range(n):
        lk(shared=True)
        ul()
    return t0, time.perf_counter_ns()


def _loop_ctx(seg: Any, n: int, counter: Any) -> tuple[int, int]:
    locked = seg.locked
    t0 = time.perf_counter_ns()
    if counter is None:
        for _ in range(n):
            with locked():
                pass
    else:
        for _ in range(n):
            with locked():
                counter[0] += 1
    return t0, time.perf_counter_ns()


def _loop_flock(fd: int, n: int, counter: Any) -> tuple[int, int]:
    fl = fcntl.flock
    ex, un = fcntl.LOCK_EX, fcntl.LOCK_UN
    t0 = time.perf_counter_ns()
    if counter is None:
        for _ in range(n):
            fl(fd, ex)
            fl(fd, un)
    else:
        for _ in range(n):
            fl(fd, ex)
            counter[0] += 1
            fl(fd, un)
    return t0, time.perf_counter_ns()


def _loop_ofd(fd: int, n: int, counter: Any) -> tuple[int, int]:
    fc = fcntl.fcntl
    setlkw, setlk = fcntl.F_OFD_SETLKW, fcntl.F_OFD_SETLK
    wr, un = _OFD_WR, _OFD_UN
    t0 = time.perf_counter_ns()
    if counter is None:
        for _ in range(n):
            fc(fd, setlkw, wr)
            fc(fd, setlk, un)
    else:
        for _ in range(n):
            fc(fd, setlkw, wr)
            counter[0] += 1
            fc(fd, setlk, un)
    return t0, time.perf_counter_ns()


class _Handle:
    """One process's handle on one lock (and the counter, when contended)."""

    def __init__(self, spec: dict[str, Any], inherited_lock: Any = None) -> None:
        self.kind = spec["kind"]
        self._closers: list[Callable[[], Any]] = []
        self.counter: Any = None
        self.seg: Any = None
        self.fd = -1
        kind = self.kind
        if kind in (SHMARRAY_EX, SHMARRAY_SH, SHMARRAY_CTX):
            import shmarray

            self.seg = shmarray.Segment(spec["key"]).attach()
            self._closers.append(self.seg.detach)
            self.acq, self.rel = self.seg.lock, self.seg.unlock
        elif kind == MP_LOCK:
            self.acq, self.rel = inherited_lock.acquire, inherited_lock.release
        elif kind == POSIX:
            import posix_ipc

            sem = posix_ipc.Semaphore(spec["name"])
            self._closers.append(sem.close)
            self.acq, self.rel = sem.acquire, sem.release
        elif kind == SYSV:
            import sysv_ipc

            sem = sysv_ipc.Semaphore(spec["semkey"])
            sem.undo = True
            self.acq, self.rel = sem.acquire, sem.release
        elif kind in (FLOCK, OFD):
            self.fd = os.open(spec["path"], os.O_RDWR | os.O_CLOEXEC)
            self._closers.append(lambda: os.close(self.fd))
        elif kind == FLOOR:
            self.acq = self.rel = int
        else:  # pragma: no cover - a programming error in this file
            raise ValueError(f"unknown lock kind {kind!r}")
        if spec.get("counter"):
            self.counter, close_counter = _counter_of(spec, self.seg)
            self._closers.insert(0, close_counter)

    def loop(self, n: int, counted: bool) -> tuple[int, int]:
        """Run n lock/unlock round trips (incrementing the counter when *counted*)."""
        counter = self.counter if counted else None
        kind = self.kind
        if kind == FLOCK:
            return _loop_flock(self.fd, n, counter)
        if kind == OFD:
            return _loop_ofd(self.fd, n, counter)
        if kind == SHMARRAY_SH:
            return _loop_shared(self.seg, n)
        if kind == SHMARRAY_CTX:
            return _loop_ctx(self.seg, n, counter)
        return _loop_calls(self.acq, self.rel, n, counter)

    def close(self) -> None:
        """Release what this handle opened."""
        for c in self._closers:
            try:
                c()
            except Exception:  # noqa: BLE001 - closing at the end of a benchmark
                pass
        self._closers.clear()


def _contender(conn: Any, spec: dict[str, Any], inherited_lock: Any, cpu: int | None) -> None:
    """A contending process (on CPU *cpu*, when given): warm up, then run n counted round trips per 'go'."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    h = _Handle(spec, inherited_lock)
    try:
        h.loop(200, counted=False)
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                return
            conn.send(h.loop(msg, counted=True))
    except (EOFError, OSError):
        return
    finally:
        h.close()


# -- setting the locks up -----------------------------------------------------------------


def _setup(ctx: Context, res: GroupResult) -> tuple[dict[str, dict[str, Any]], Any, Any]:
    """Create every lock (registered for cleanup); returns specs, the shmarray segment, the mp lock."""
    import shmarray

    cl = ctx.cleanup
    specs: dict[str, dict[str, Any]] = {}
    counter_path = f"/dev/shm/{cl.name('counter')}"
    fd = os.open(counter_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    cl.add(counter_path, lambda: os.unlink(counter_path))
    os.ftruncate(fd, 4096)
    os.close(fd)

    key = cl.name("lock")
    seg = shmarray.Segment(key).create(4096)
    cl.add(f"segment {key}", seg.detach)
    for kind in (SHMARRAY_EX, SHMARRAY_SH, SHMARRAY_CTX):
        specs[kind] = {"kind": kind, "key": key, "counter": True}
    specs[MP_LOCK] = {"kind": MP_LOCK, "counter": counter_path}
    mp_lock = MP.Lock()

    if have("posix_ipc"):
        import posix_ipc

        name = "/" + cl.name("sem")
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)
        sem.close()
        cl.add(name, lambda: posix_ipc.unlink_semaphore(name))
        specs[POSIX] = {"kind": POSIX, "name": name, "counter": counter_path}
    else:
        res.skipped.append(f"{POSIX}: posix_ipc is not installed")

    if have("sysv_ipc"):
        import sysv_ipc

        ssem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, initial_value=1)
        cl.add(f"sysv semaphore {ssem.key}", ssem.remove)
        specs[SYSV] = {"kind": SYSV, "semkey": ssem.key, "counter": counter_path}
    else:
        res.skipped.append(f"{SYSV}: sysv_ipc is not installed (pip install 'shmarray-zerocopy[bench]')")

    path = f"/dev/shm/{cl.name('flock')}"
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    cl.add(path, lambda: os.unlink(path))
    specs[FLOCK] = {"kind": FLOCK, "path": path, "counter": counter_path}
    specs[OFD] = {"kind": OFD, "path": path, "counter": counter_path}
    specs[FLOOR] = {"kind": FLOOR}
    return specs, seg, mp_lock


def _counter_of(spec: dict[str, Any], seg: Any) -> tuple[Any, Callable[[], None]]:
    if spec.get("key") is not None:
        view = seg.data.cast("Q")
        return view, view.release
    fd = os.open(spec["counter"], os.O_RDWR | os.O_CLOEXEC)
    mm = mmap.mmap(fd, 4096)
    os.close(fd)
    view = memoryview(mm).cast("Q")

    def close() -> None:
        view.release()
        mm.close()

    return view, close


def _contender_cpus() -> list[int]:
    """Two different CPUs for the two contenders, or [] where this process may use only one.

    Left to the scheduler, the two processes of a pair sometimes share one
    CPU: they then take turns by time slice, the lock almost never changes
    hands, and the round measures an uncontended lock. Which pair that
    happens to differs from run to run (it made flock's contended median
    move by 20% between runs), so each contender gets a CPU of its own.
    """
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[:2] if len(cpus) >= 2 else []


class _Pair:
    """Two contending processes on one lock, started once; each sample is one counted round."""

    def __init__(self, kind: str, spec: dict[str, Any], seg: Any, mp_lock: Any, n: int) -> None:
        self.kind, self.n = kind, n
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.counter, self._close_counter = _counter_of(spec, seg)
        cpus = _contender_cpus()
        for i in range(2):
            parent, child = MP.Pipe()
            p = MP.Process(target=_contender, daemon=True,
                           args=(child, spec, mp_lock if kind == MP_LOCK else None, cpus[i] if cpus else None))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    def wait_ready(self) -> None:
        """Raise unless both processes warmed up within 60 s."""
        for c in self.conns:
            if not c.poll(60) or c.recv() != "ready":
                raise RuntimeError("a contending process did not start within 60 s")

    def sample(self) -> float:
        """ns per increment of one round: 2 processes x n increments, the counter checked."""
        n = self.n
        self.counter[0] = 0
        for c in self.conns:
            c.send(n)
        spans = []
        for c in self.conns:
            if not c.poll(120):
                raise RuntimeError("a contending process did not finish within 120 s")
            spans.append(c.recv())
        if self.counter[0] != 2 * n:
            raise RuntimeError(f"lost updates: counter is {self.counter[0]}, expected {2 * n}: "
                               "the lock did not exclude")
        start = min(s for s, _ in spans)
        end = max(e for _, e in spans)
        return (end - start) / (2 * n)

    def close(self) -> None:
        """Stop both processes and release the counter."""
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()
        self._close_counter()


def _contended(ctx: Context, specs: dict[str, dict[str, Any]], seg: Any, mp_lock: Any,
               n: int, reps: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """ns per increment of every exclusive lock, its rounds interleaved with the other locks' rounds.

    Every lock's pair of processes is started first and waits between
    rounds, so that a slow spell of this shared machine lands on all the
    locks alike instead of on whichever one ran during it.
    """
    pairs: dict[str, _Pair] = {}
    errors: dict[str, str] = {}
    try:
        for kind, spec in specs.items():
            pairs[kind] = _Pair(kind, spec, seg, mp_lock, n)
        for kind, pair in list(pairs.items()):
            try:
                pair.wait_ready()
            except RuntimeError as e:
                errors[kind] = str(e)
                pairs.pop(kind).close()
        ctx.log(f"  contended: {len(pairs)} locks x 2 processes x {n} increments, interleaved")
        samples, errs = interleave(ctx, {k: p.sample for k, p in pairs.items()}, reps=reps, warmup=1)
        errors.update(errs)
        for kind in errors:
            samples[kind] = []
        return samples, errors
    finally:
        for pair in pairs.values():
            pair.close()


def run(ctx: Context) -> GroupResult:
    """Measure every installed lock, uncontended and contended."""
    res = GroupResult(NAME, TITLE)
    specs, seg, mp_lock = _setup(ctx, res)
    # Many short samples rather than a few long ones: on a busy machine a
    # preempted sample is an outlier the median drops.
    n_un = 5_000 if ctx.quick else 10_000
    handles: dict[str, _Handle] = {}
    try:
        for kind, spec in specs.items():
            handles[kind] = _Handle(spec, mp_lock if kind == MP_LOCK else None)

        def one(h: _Handle) -> Callable[[], float]:
            def sample() -> float:
                t0, t1 = h.loop(n_un, counted=False)
                return (t1 - t0) / n_un

            return sample

        ctx.log(f"  uncontended: {len(handles)} locks x {n_un} round trips")
        samples, errors = interleave(ctx, {k: one(h) for k, h in handles.items()},
                                     reps=ctx.reps(41, 5), warmup=1)
    finally:
        for h in handles.values():
            h.close()
    for kind in specs:
        res.rows.append(Row(kind, samples[kind], unit="ns", variant="uncontended",
                            role=_role(kind), error=errors.get(kind, ""),
                            extra={"kernel_released": KERNEL_RELEASED.get(kind)}))

    n_con = 2_000 if ctx.quick else 20_000
    # Shared holders do not exclude each other: there is no counter to protect.
    excl = {k: v for k, v in specs.items() if k not in (FLOOR, SHMARRAY_SH)}
    con, con_errors = _contended(ctx, excl, seg, mp_lock, n_con, ctx.reps(12, 3))
    for kind in excl:
        res.rows.append(Row(kind, con.get(kind, []), unit="ns", variant="contended", role=_role(kind),
                            error=con_errors.get(kind, ""),
                            extra={"kernel_released": KERNEL_RELEASED.get(kind), "increments": 2 * n_con}))
    res.notes.append(
        "Kernel-released: the kernel drops the lock when its holder dies (shmarray, flock, OFD, "
        "SysV with SEM_UNDO). multiprocessing.Lock and posix_ipc semaphores stay taken: the next "
        "acquirer hangs. Figures include the Python loop and call overhead (see the floor row)."
    )
    _headline(res)
    return res


def _role(kind: str) -> str:
    if kind.startswith("shmarray"):
        return "shmarray"
    return "floor" if kind == FLOOR else "peer"


def _headline(res: GroupResult) -> None:
    for variant in ("uncontended", "contended"):
        ours = res.median(SHMARRAY_EX, variant=variant)
        peers = {k: res.median(k, variant=variant) for k in (SYSV, FLOCK, OFD)}
        peers = {k: v for k, v in peers.items() if v is not None}
        if ours is None or not peers:
            res.headline(f"lock ({variant}) within 1.3x of the fastest kernel-released lock", None,
                         "<= 1.3", None, "not measured")
            continue
        best = min(peers, key=lambda k: peers[k])
        ratio = ours / peers[best]
        res.headline(
            f"lock ({variant}): shmarray exclusive / fastest kernel-released",
            ratio, "<= 1.3", ratio <= 1.3,
            f"shmarray {ours:.0f} ns vs {best} {peers[best]:.0f} ns",
        )
