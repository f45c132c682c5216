"""create: shmarray.create + a fill in place + a warm process attaches and sums, phase by phase.

One composite method, split into phases: create(), the fill in place, the
consumer's attach, its sum, its teardown (unmapping), and the handoff (the
pipe round trip minus what the consumer timed itself); "sharing" is
create() + handoff + attach, what sharing adds beyond writing the data.
Against it, each a method of its own: create() of a 4 KiB array (the fixed
cost), posix_fallocate of the same size into a fresh /dev/shm file (the
page reservation create() makes, so that a full /dev/shm is an error, not a
SIGBUS), and the first-touch fill of fresh anonymous shared pages (a floor).
512 MiB float64 (16 MiB in --quick).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Callable

import numpy as np

from .._harness import Context, GroupResult, Row, Worker, human_size, interleave, recording
from . import _peers as P

NAME = "create"
TITLE = "Create: create() + fill in place + a warm process attaches, phase by phase"

CREATE = "create()"
FILL = "fill in place"
ATTACH = "consumer attach"
SUM = "consumer sum"
TEARDOWN = "consumer teardown (unmap)"
HANDOFF = "handoff (pipe round trip)"
SHARING = "sharing: create() + handoff + attach"
SMALL = "create() of 4 KiB"
FALLOC = "floor: posix_fallocate of the same size"
TOUCH = "floor: fill fresh shared pages (first touch)"
PHASES = (CREATE, FILL, ATTACH, SUM, TEARDOWN, HANDOFF, SHARING)


def attach_sum_in_worker(name: str) -> tuple[float, float, float, float]:
    """(sum, attach s, sum s, teardown s) of array segment *name*."""
    import shmarray

    t0 = time.perf_counter()
    arr = shmarray.attach(name)
    t1 = time.perf_counter()
    total = float(arr.sum())
    t2 = time.perf_counter()
    arr.close()
    del arr
    return total, t1 - t0, t2 - t1, time.perf_counter() - t2


def run(ctx: Context) -> GroupResult:
    """Measure the phases of create + fill + attach, and the pieces they are compared with."""
    import shmarray

    res = GroupResult(NAME, TITLE)
    size = P.big_size(res, ctx.quick, 16 << 20, copies=3)
    variant = human_size(size)
    src = P.source_array(size)
    want = float(src.sum())
    phases: dict[str, list[float]] = {p: [] for p in PHASES}

    def undo(name: str) -> Callable[[], None]:
        def go() -> None:
            try:
                shmarray.unlink(name)
            except shmarray.NotFoundError:
                pass
        return go

    with Worker() as w:
        w.call(P.import_in_worker, "numpy", "shmarray")

        def composite() -> float:
            name = ctx.cleanup.name("cre")
            h = ctx.cleanup.add(name, undo(name))
            try:
                t0 = time.perf_counter()
                a = shmarray.create(name, src.shape)
                t1 = time.perf_counter()
                np.copyto(a, src)
                t2 = time.perf_counter()
                got, att, summ, down = w.call(attach_sum_in_worker, name)
                t3 = time.perf_counter()
                a.close()
                del a
            finally:
                ctx.cleanup.done(h)
            if not P.close_enough(got, want):
                raise RuntimeError(f"the consumer summed {got!r}, expected {want!r}")
            handoff = (t3 - t2) - att - summ - down
            if recording():
                for k, v in zip(PHASES, (t1 - t0, t2 - t1, att, summ, down, handoff, (t1 - t0) + handoff + att)):
                    phases[k].append(v)
            return t3 - t0

        def small() -> float:
            name = ctx.cleanup.name("cre4k")
            h = ctx.cleanup.add(name, undo(name))
            try:
                t0 = time.perf_counter()
                a = shmarray.create(name, 512)
                t1 = time.perf_counter()
                a.close()
                del a
            finally:
                ctx.cleanup.done(h)
            return t1 - t0

        def falloc() -> float:
            path = P.shm_tag_name(ctx.cleanup, "falloc")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                t0 = time.perf_counter()
                os.posix_fallocate(fd, 0, size)
                return time.perf_counter() - t0
            finally:
                os.close(fd)
                os.unlink(path)

        def touch() -> float:
            m = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: shmem pages, as in /dev/shm
            try:
                dst = np.frombuffer(m, np.float64)
                t0 = time.perf_counter()
                np.copyto(dst, src)
                t1 = time.perf_counter()
                del dst
            finally:
                m.close()
            return t1 - t0

        whole = "create() + fill in place + consumer attach, sum, teardown (end to end)"
        methods = {whole: composite, SMALL: small, FALLOC: falloc, TOUCH: touch}
        reps = ctx.reps(7, 3)
        ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    res.rows.append(Row(whole, samples[whole], variant=variant, role="shmarray", error=errors.get(whole, "")))
    for p in PHASES:
        res.rows.append(Row(p, phases[p] if samples[whole] else [], variant=variant, role="shmarray",
                            error=errors.get(whole, "")))
    for m in (SMALL, FALLOC, TOUCH):
        res.rows.append(Row(m, samples[m], variant=variant, role="floor" if m.startswith("floor") else "shmarray",
                            error=errors.get(m, "")))
    res.notes.append(
        "Phases come from the same samples as the end-to-end row. 'handoff' is the pipe round trip minus "
        "what the consumer timed itself; 'sharing' (create() + handoff + attach) is what sharing adds to "
        "writing the data; compare it with the page reservation (posix_fallocate) that create() makes."
    )
    made = [res.median(CREATE, variant=variant), res.median(FILL, variant=variant)]
    floor = res.median(TOUCH, variant=variant)
    if None not in made and floor:
        r = (made[0] + made[1]) / floor  # type: ignore[operator]
        res.headline("create() + fill in place / first-touch fill of fresh shared pages", r, "informational",
                     None, f"{variant}: create() {made[0] * 1e3:.2f} ms + fill {made[1] * 1e3:.2f} ms "  # type: ignore[index]
                     f"vs first touch {floor * 1e3:.2f} ms")
    else:
        res.headline("create() + fill in place / first-touch fill of fresh shared pages", None, "informational",
                     None, "not measured")
    return res
