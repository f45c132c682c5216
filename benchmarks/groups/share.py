"""share: an existing ndarray -> a warm process that returns its sum, 1 MiB to 512 MiB (1 GiB full).

Each sample is timed here, end to end: from the array in private memory to
the consumer's sum back in this process (the producer's copy into shared
memory, the handoff, the consumer's attach, its first touch of every page
and the sum). Teardown (unlink) comes after the clock stops. Every sum is
checked against the source's.

Floors (one process, no handoff, no sum): copying into shared memory that
was already touched (np.copyto), the first touch of fresh shared pages
(filling a fresh mapping), and os.pwrite into a fresh /dev/shm file (the
write path shmarray.share uses).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from typing import Any, Callable

import numpy as np

from .._harness import (MP, Context, GroupResult, Row, Worker, have, human_size, interleave, mem_available,
                        recording)
from . import _peers as P

NAME = "share"
TITLE = "Share: existing ndarray -> warm process returns its sum"

SHARE = "shmarray.share"
CREATE = "shmarray.create in place (fill excluded)"
CREATE_FILL = "shmarray.create + fill"
STDLIB = "stdlib SharedMemory by hand"
SHAREDARRAY = "SharedArray.create + copy"
TORCH = "torch share_memory_() + send"
PIPE = "multiprocessing.Pipe (pickle)"
QUEUE = "multiprocessing.Queue (pickle)"
F_COPY = "floor: np.copyto into touched shared memory"
F_FAULT = "floor: fill fresh shared pages (first touch)"
F_PWRITE = "floor: os.pwrite into a fresh /dev/shm file"

ROLES = {SHARE: "shmarray", CREATE: "shmarray", CREATE_FILL: "shmarray",
         F_COPY: "floor", F_FAULT: "floor", F_PWRITE: "floor"}


def sizes(ctx: Context) -> list[int]:
    """1 MiB .. 512 MiB, plus 1 GiB in a full run when memory allows (pickling holds ~4 copies)."""
    if ctx.quick:
        return [1 << 20, 16 << 20]
    out = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 512 << 20]
    if mem_available() > 8 * (1 << 30):
        out.append(1 << 30)
    return out


def _reps(ctx: Context, size: int) -> int:
    if ctx.quick:
        return 3
    return 15 if size <= 16 << 20 else 7


class _Share:
    """The methods at one size; each ``m_*`` returns one sample (seconds) or raises."""

    def __init__(self, ctx: Context, w: Worker, qw: Worker | None, src: np.ndarray, want: float) -> None:
        self.ctx, self.w, self.qw, self.src, self.want = ctx, w, qw, src, want
        self.meta: P.Meta = (src.shape, src.dtype.str)
        self.fill_s: list[float] = []  # CREATE's fill times, paired with its samples
        self.phases: dict[str, list[tuple[float, float]]] = {}  # method -> (producer s, rest s)

    def _check(self, got: float, method: str) -> None:
        if not P.close_enough(got, self.want):
            raise RuntimeError(f"{method}: the consumer summed {got!r}, expected {self.want!r}")

    def _phase(self, method: str, producer: float, total: float) -> None:
        if recording():
            self.phases.setdefault(method, []).append((producer, total - producer))

    def _by_name(self, method: str, label: str) -> float:
        name = self.ctx.cleanup.name(method[:3])
        t0 = time.perf_counter()
        made = P.make(method, name, self.ctx.cleanup, self.src, self.src.shape, self.src.dtype)
        t1 = time.perf_counter()
        try:
            got, _ = self.w.call(P.attach_sum_in_worker, method, name, self.meta)
            t2 = time.perf_counter()
        finally:
            made.release()
        self._check(got, label)
        self._phase(label, t1 - t0, t2 - t0)
        return t2 - t0

    def m_share(self) -> float:
        return self._by_name(P.SHMARRAY, SHARE)

    def m_stdlib(self) -> float:
        return self._by_name(P.STDLIB, STDLIB)

    def m_sharedarray(self) -> float:
        return self._by_name(P.SHAREDARRAY, SHAREDARRAY)

    def m_create(self) -> float:
        name = self.ctx.cleanup.name("cre")
        src = self.src
        t0 = time.perf_counter()
        made = P.make(P.SHMARRAY, name, self.ctx.cleanup, None, src.shape, src.dtype)  # shmarray.create
        t1 = time.perf_counter()
        try:
            np.copyto(made.hold, src)
            t2 = time.perf_counter()
            got, _ = self.w.call(P.attach_sum_in_worker, P.SHMARRAY, name, self.meta)
            t3 = time.perf_counter()
        finally:
            made.release()
        self._check(got, CREATE)
        self.fill_s.append(t2 - t1)
        self._phase(CREATE, t1 - t0, (t3 - t0) - (t2 - t1))
        return (t3 - t0) - (t2 - t1)

    def m_torch(self) -> float:
        import torch
        import torch.multiprocessing  # noqa: F401 - registers the shared-memory reductions

        t0 = time.perf_counter()
        t = torch.from_numpy(self.src)
        t.share_memory_()
        t1 = time.perf_counter()
        got = self.w.call(P.sum_tensor_in_worker, t)
        t2 = time.perf_counter()
        del t
        self._check(got, TORCH)
        self._phase(TORCH, t1 - t0, t2 - t0)
        return t2 - t0

    def m_pipe(self) -> float:
        t0 = time.perf_counter()
        got = self.w.call(P.sum_in_worker, self.src)
        t1 = time.perf_counter()
        self._check(got, PIPE)
        return t1 - t0

    def m_queue(self) -> float:
        assert self.qw is not None
        q = self.qw_queue
        t0 = time.perf_counter()
        self.qw.send(P.sum_from_queue_in_worker)
        q.put(self.src)
        got = self.qw.result(300)
        t1 = time.perf_counter()
        self._check(got, QUEUE)
        return t1 - t0

    qw_queue: Any = None

    def f_copy(self) -> float:
        # The destination was touched once before the timing; each sample copies over it.
        dst = self._touched
        t0 = time.perf_counter()
        np.copyto(dst, self.src)
        return time.perf_counter() - t0

    _touched: Any = None

    def f_fault(self) -> float:
        m = mmap.mmap(-1, self.src.nbytes)  # MAP_SHARED|MAP_ANONYMOUS: shmem pages, as in /dev/shm
        try:
            dst = np.frombuffer(m, self.src.dtype)
            t0 = time.perf_counter()
            np.copyto(dst, self.src)
            t1 = time.perf_counter()
            del dst
        finally:
            m.close()
        return t1 - t0

    def f_pwrite(self) -> float:
        path = P.shm_tag_name(self.ctx.cleanup, "pw")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        h = self.ctx.cleanup.add(path, lambda: os.unlink(path))
        try:
            view = memoryview(self.src).cast("B")
            t0 = time.perf_counter()
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done : done + (1 << 30)], done)
            t1 = time.perf_counter()
        finally:
            os.close(fd)
            self.ctx.cleanup.done(h)
        return t1 - t0


def run(ctx: Context) -> GroupResult:
    """Measure every share method at every size."""
    res = GroupResult(NAME, TITLE, throughput=True)
    why_not = P.shmarray_missing()
    torch_ok = have("torch")
    sa_ok = have("SharedArray")
    if not torch_ok:
        res.skipped.append(f"{TORCH}: torch is not installed (not part of the bench extra: it is large)")
    if not sa_ok:
        res.skipped.append(f"{SHAREDARRAY}: the SharedArray package is not installed "
                           "(pip install 'shmarray-zerocopy[bench]')")
    queue = MP.Queue()
    with Worker() as w, Worker(queue=queue) as qw:
        mods = ["numpy", "shmarray", "SharedArray", "multiprocessing.shared_memory"]
        if torch_ok:
            mods += ["torch", "torch.multiprocessing"]
            import torch.multiprocessing  # noqa: F401 - here too: reductions and its import time
        w.call(P.import_in_worker, *mods)
        qw.call(P.import_in_worker, "numpy")
        for size in sizes(ctx):
            src = P.source_array(size)
            want = float(src.sum())
            s = _Share(ctx, w, qw, src, want)
            s.qw_queue = queue
            touched = mmap.mmap(-1, size)
            s._touched = np.frombuffer(touched, np.float64)
            s._touched[:] = 0
            methods: dict[str, Callable[[], float]] = {}
            if why_not is None:
                methods[SHARE] = s.m_share
                methods[CREATE] = s.m_create
            methods[STDLIB] = s.m_stdlib
            if sa_ok:
                methods[SHAREDARRAY] = s.m_sharedarray
            if torch_ok:
                methods[TORCH] = s.m_torch
            methods[PIPE] = s.m_pipe
            methods[QUEUE] = s.m_queue
            methods[F_COPY] = s.f_copy
            methods[F_FAULT] = s.f_fault
            methods[F_PWRITE] = s.f_pwrite
            reps = _reps(ctx, size)
            ctx.log(f"  {human_size(size)}: {len(methods)} methods x {reps}")
            try:
                samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
            finally:
                s._touched = None
                touched.close()
            if why_not is not None:
                for label in (SHARE, CREATE):
                    res.rows.append(Row(label, [], size=size, role="shmarray", error=why_not))
            for label, fn in methods.items():
                extra: dict[str, Any] = {}
                if label in s.phases:
                    ph = s.phases[label][-len(samples[label]):] if samples[label] else []
                    extra["producer_s"] = [round(p, 6) for p, _ in ph]
                    extra["handoff_and_consumer_s"] = [round(c, 6) for _, c in ph]
                res.rows.append(Row(label, samples[label], size=size, role=ROLES.get(label, "peer"),
                                    error=errors.get(label, ""), extra=extra))
                if label == CREATE:
                    # Same repetitions, fill included.
                    fills = s.fill_s[-len(samples[label]):] if samples[label] else []
                    both = [a + b for a, b in zip(samples[label], fills)]
                    res.rows.append(Row(CREATE_FILL, both, size=size, role="shmarray",
                                        error=errors.get(label, ""), extra={"fill_s": fills}))
            del src, s
    res.notes.append(
        "Times are end to end (array in private memory -> sum back here). 'create in place' is the "
        "producer that computes straight into shared memory: its fill (np.copyto into the new array) "
        "is subtracted; 'create + fill' is the same repetitions with it. The floors are single-process "
        "copies without handoff or sum. The per-phase split (producer / handoff+consumer) of every "
        "sample is in results.json."
    )
    _headline(res)
    return res


def _headline(res: GroupResult) -> None:
    szs = sorted({r.size for r in res.rows if r.size is not None})

    # One size alone is at the mercy of the machine (the largest sizes have the fewest
    # repeats and page the most): the headline is the geometric mean over all sizes,
    # with every size listed and the worst named.
    for peer, target, limit in ((TORCH, ">= 1.0", 1.0), (STDLIB, ">= 1.5", 1.5)):
        rs = res.ratios(SHARE, peer, szs)
        aim = f"share(): {peer} time / shmarray.share time (geometric mean over sizes)"
        if not rs:
            res.headline(aim, None, target, None, "not measured")
            continue
        gmean = math.exp(sum(math.log(r) for _, r in rs) / len(rs))
        worst = min(rs, key=lambda x: x[1])
        short = [human_size(s) for s, r in rs if r < limit]
        res.headline(aim, gmean, target, gmean >= limit,
                     f"worst {worst[1]:.2f}x at {human_size(worst[0])}; below target at "
                     f"{', '.join(short) if short else 'no size'}; all: "
                     + ", ".join(f"{human_size(s)} {r:.2f}x" for s, r in rs))
