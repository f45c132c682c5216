"""writes: the ways to put an array's bytes into a fresh /dev/shm file, the ones share() and create() chose among.

Each sample starts from an empty file (or no segment) and ends with the
bytes written: pwrite from the source (one thread, or two threads on two
halves: os.pwrite releases the GIL), posix_fallocate + mmap + copy, and
ftruncate + mmap + copy (what a plain mapping does); for a fill value, pwrite
of a repeated 4 MiB chunk against posix_fallocate + mmap + ndarray.fill; for
zeros, posix_fallocate alone. Beside them, the library's own calls:
``shmarray.share``, ``shmarray.create(fill=)`` and ``shmarray.create`` (the
segment's control page and header included). 512 MiB (16 MiB in --quick).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from .._harness import Context, GroupResult, Row, human_size, interleave
from . import _peers as P

NAME = "writes"
TITLE = "Write paths: an array's bytes into a fresh /dev/shm file"

SHARE = "shmarray.share"
CREATE_FILL = "shmarray.create(fill=1.5)"
CREATE = "shmarray.create (zeros)"
PWRITE1 = "copy: pwrite, 1 thread (share's path)"
PWRITE2 = "copy: pwrite, 2 threads"
FALLOC_COPY = "copy: posix_fallocate + mmap + copyto"
TRUNC_COPY = "copy: ftruncate + mmap + copyto"
PATTERN = "fill: pwrite of a 4 MiB chunk (create(fill=)'s path)"
FALLOC_FILL = "fill: posix_fallocate + mmap + fill"
ZEROS = "zeros: posix_fallocate (create()'s path)"
OURS = (SHARE, CREATE_FILL, CREATE)


def run(ctx: Context) -> GroupResult:
    """Measure every write path and the library calls built on them, interleaved."""
    import shmarray

    res = GroupResult(NAME, TITLE)
    size = P.big_size(res, ctx.quick, 16 << 20, copies=3)
    variant = human_size(size)
    src = np.random.default_rng(0).random(size // 8)
    raw = memoryview(src).cast("B")

    def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)

    def timed(body: Callable[[int], None]) -> Callable[[], float]:
        def one() -> float:
            path = P.shm_tag_name(ctx.cleanup, "wp")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                t0 = time.perf_counter()
                body(fd)
                return time.perf_counter() - t0
            finally:
                os.close(fd)
                os.unlink(path)
        return one

    def pwrite1(fd: int) -> None:
        os.ftruncate(fd, size)
        pwrite_all(fd, raw, 0)

    def pwrite2(fd: int) -> None:
        os.ftruncate(fd, size)
        half = size // 2
        t = threading.Thread(target=pwrite_all, args=(fd, raw[half:], half))
        t.start()
        pwrite_all(fd, raw[:half], 0)
        t.join()

    def mapped(reserve: bool, fill: bool) -> Callable[[int], None]:
        def body(fd: int) -> None:
            if reserve:
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
            dst = np.frombuffer(m, np.float64)
            if fill:
                dst.fill(1.5)
            else:
                np.copyto(dst, src)
            del dst
            m.close()
        return body

    def pattern(fd: int) -> None:
        os.ftruncate(fd, size)
        chunk = np.full(min(size, 4 << 20) // 8, 1.5)
        view = memoryview(chunk).cast("B")
        for off in range(0, size, view.nbytes):
            pwrite_all(fd, view[: min(view.nbytes, size - off)], off)

    def library(make: Callable[[str], Any]) -> Callable[[], float]:
        def one() -> float:
            name = ctx.cleanup.name("wr")

            def undo() -> None:
                try:
                    shmarray.unlink(name)
                except shmarray.NotFoundError:
                    pass

            h = ctx.cleanup.add(name, undo)
            try:
                t0 = time.perf_counter()
                a = make(name)
                t1 = time.perf_counter()
                a.close()
                del a
            finally:
                ctx.cleanup.done(h)
            return t1 - t0
        return one

    methods: dict[str, Callable[[], float]] = {
        SHARE: library(lambda k: shmarray.share(k, src)),
        CREATE_FILL: library(lambda k: shmarray.create(k, src.shape, fill=1.5)),
        CREATE: library(lambda k: shmarray.create(k, src.shape)),
        PWRITE1: timed(pwrite1),
        PWRITE2: timed(pwrite2),
        FALLOC_COPY: timed(mapped(True, False)),
        TRUNC_COPY: timed(mapped(False, False)),
        PATTERN: timed(pattern),
        FALLOC_FILL: timed(mapped(True, True)),
        ZEROS: timed(lambda fd: os.posix_fallocate(fd, 0, size)),
    }
    reps = ctx.reps(7, 3)
    ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
    samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    for m in methods:
        res.rows.append(Row(m, samples[m], variant=variant, role="shmarray" if m in OURS else "floor",
                            error=errors.get(m, ""), extra={"bytes": size}))
    res.notes.append(
        "Every sample writes fresh pages of a new file (or a new segment) and removes it after the clock "
        "stops. The library rows include the control page, the header and the reservation; the other rows "
        "are the bare paths the library chose among, always into fresh pages; the library's calls may build "
        "their segment in recycled pages (_reuse.kept_files: a creator keeps its destroyed segments' files), as a "
        "producer sharing one array after another does. GB/s = size / median."
    )
    for ours, path in ((SHARE, PWRITE1), (CREATE_FILL, PATTERN), (CREATE, ZEROS)):
        a, b = res.median(ours, variant=variant), res.median(path, variant=variant)
        ok = a is not None and b is not None and b > 0
        res.headline(f"writes: {ours} time / its bare path's time ({path})", a / b if ok else None,  # type: ignore[operator]
                     "informational", None,
                     f"{variant}: {a * 1e3:.2f} ms vs {b * 1e3:.2f} ms" if ok else "not measured")  # type: ignore[operator]
    return res
