"""dirs: share() and create() on a huge-page tmpfs (``huge=within_size``) against /dev/shm, same run.

The group mounts the tmpfs itself, so it needs root and unshare(1): the
measuring runs in a child process in a private mount namespace (this
module run as a script), where a ``huge=within_size`` tmpfs is mounted on a
temporary directory and segments go there through ``dir=``. Elsewhere the
group is skipped with a note.

Each share sample: a plain ndarray here -> ``shmarray.share(key, a, dir=D)``
-> a warm Pool worker attaches it and reads its last element, a new key
every time, with memory reuse off (fresh pages every time: the first
hand-off of a pipeline, or any hand-off without reuse) and on (warm pages
after the first: each directory recycles its own files, and the tmpfs is
sized so that its default reuse budget, a quarter of it, holds one
segment). A second tmpfs, mounted ``huge=advise``, gets its huge pages
through the mapping shmarray fills fresh segments through there. The floor is a warm memcpy of the same bytes (``np.copyto``
into an already-touched private array). ``create()`` of 512 MiB of zeros,
its reservation (posix_fallocate) included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from .._harness import Cleanup, Context, GroupResult, Row, interleave

NAME = "dirs"
TITLE = "Segment directories: a huge-page tmpfs against /dev/shm"

SHARE_HUGE = "share() on a huge=within_size tmpfs, reuse off"
SHARE_SHM_FRESH = "share() on /dev/shm, reuse off"
SHARE_SHM_WARM = "share() on /dev/shm, reuse on (warm pages)"
SHARE_HUGE_WARM = "share() on a huge=within_size tmpfs, reuse on (warm pages)"
SHARE_ADVISE = "share() on a huge=advise tmpfs, reuse off"
CREATE_HUGE = "create() of zeros on a huge=within_size tmpfs"
CREATE_SHM = "create() of zeros on /dev/shm"
FLOOR = "floor: warm memcpy of the same bytes"


def last_item(a: Any) -> float:
    """The worker's task: attach (by unpickling) and read one element."""
    return float(a[-1])


def run(ctx: Context) -> GroupResult:
    """Run the measurements in a private mount namespace, collect the samples."""
    res = GroupResult(NAME, TITLE)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        res.skipped.append("dirs: needs root and unshare(1) to mount a huge-page tmpfs (skipped)")
        res.rows.append(Row(SHARE_HUGE, [], variant="512 MiB", role="shmarray", error="not run: needs root"))
        return res
    size = (64 << 20) if ctx.quick else (512 << 20)
    reps = ctx.reps(7, 3)
    mnt = tempfile.mkdtemp(prefix="shmbench-huge-")
    try:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs -o size={5 * size + (64 << 20)},huge=within_size tmpfs {mnt} && "
               f"mkdir {mnt}/advise && mount -t tmpfs -o size={2 * size + (64 << 20)},huge=advise tmpfs "
               f"{mnt}/advise && "
               f"exec {sys.executable} -m benchmarks.groups.dirs {mnt} {size} {reps}"]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    finally:
        os.rmdir(mnt)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring child failed ({out.returncode}): {out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    variant = f"{size >> 20} MiB float64"
    roles = {SHARE_HUGE: "shmarray", SHARE_SHM_FRESH: "shmarray", SHARE_SHM_WARM: "shmarray",
             SHARE_HUGE_WARM: "shmarray", SHARE_ADVISE: "shmarray",
             CREATE_HUGE: "shmarray", CREATE_SHM: "shmarray", FLOOR: "floor"}
    for label, samples in data["samples"].items():
        res.rows.append(Row(label, samples, variant=variant, role=roles[label], error=data["errors"].get(label, "")))
    res.notes.append(f"The huge-page mapping: {data['pmd_kb']} KiB of the last huge-tmpfs segment were mapped "
                     "by 2 MiB pages (ShmemPmdMapped in /proc/self/smaps of the creator).")
    res.notes.append("Each share sample: an ndarray here -> share(dir=...) -> a warm spawn Pool worker unpickles "
                     "the reference and reads the last element; a new key every time.")
    huge, fresh, warm, huge_warm, floor = (res.median(m, variant=variant) for m in (
        SHARE_HUGE, SHARE_SHM_FRESH, SHARE_SHM_WARM, SHARE_HUGE_WARM, FLOOR))
    if huge and fresh:
        res.headline("share() to a waiting worker: /dev/shm (fresh pages) / huge-page tmpfs", fresh / huge, ">= 3",
                     fresh / huge >= 3, f"{variant}: /dev/shm {fresh * 1e3:.0f} ms vs huge {huge * 1e3:.0f} ms")
    if huge and floor:
        res.headline("share() on the huge-page tmpfs / warm memcpy", huge / floor, "<= 2", huge / floor <= 2,
                     f"{variant}: {huge * 1e3:.0f} ms vs memcpy {floor * 1e3:.0f} ms")
    advise = res.median(SHARE_ADVISE, variant=variant)
    if advise and fresh:
        res.headline("share() to a waiting worker: /dev/shm (fresh pages) / huge=advise tmpfs", fresh / advise,
                     "(no aim)", None, f"{variant}: /dev/shm {fresh * 1e3:.0f} ms vs advise {advise * 1e3:.0f} ms")
    if huge_warm and floor:
        res.headline("share() on the huge-page tmpfs with reuse / warm memcpy", huge_warm / floor, "<= 2",
                     huge_warm / floor <= 2, f"{variant}: {huge_warm * 1e3:.0f} ms vs memcpy {floor * 1e3:.0f} ms")
    if huge and warm:
        res.headline("share() on /dev/shm with warm pages (reuse) / huge-page tmpfs", warm / huge, "(no aim)", None,
                     f"{variant}: {warm * 1e3:.0f} ms vs {huge * 1e3:.0f} ms")
    create = res.median(CREATE_HUGE, variant=variant)
    if create is not None:
        # A time, not a ratio of peers: the "ratio" is the share of the 20 ms aim it used.
        res.headline("create() on the huge-page tmpfs (reservation included) / the 20 ms aim", create / 0.020,
                     "< 1", create < 0.020, f"{variant}: {create * 1e3:.1f} ms; /dev/shm "
                     f"{(res.median(CREATE_SHM, variant=variant) or 0) * 1e3:.1f} ms")
    return res


def _measure(mnt: str, size: int, reps: int) -> dict[str, Any]:
    """In the private mount namespace: every method, interleaved, *reps* times after one warm-up."""
    import multiprocessing as mp

    import shmarray
    from shmarray._reuse import idle_maps

    src = np.arange(size // 8, dtype=np.float64)
    floor_dst = np.empty_like(src)
    np.copyto(floor_dst, src)
    pool = mp.get_context("spawn").Pool(1)
    pool.map(last_item, [np.zeros(2)] * 2)
    counter = [0]
    pmd = [0]

    def key() -> str:
        counter[0] += 1
        return f"shmbench-{os.getpid()}-dirs-{counter[0]}"

    def share(where: str | None, reuse: bool) -> float:
        idle_maps.set_budget(None if reuse else 0)
        k = key()
        t0 = time.perf_counter()
        a = shmarray.share(k, src, dir=where)
        got = pool.apply(last_item, (a,))
        t1 = time.perf_counter()
        if got != src[-1]:
            raise RuntimeError(f"the worker read {got!r}")
        if where == mnt:
            pmd[0] = _pmd_kb(a)
        del a
        pool.apply(last_item, (np.zeros(2),))  # the pool's handler thread drops the last arguments
        return t1 - t0

    def create(where: str | None) -> float:
        idle_maps.set_budget(0)
        k = key()
        t0 = time.perf_counter()
        a = shmarray.create(k, (size // 8,), np.float64, dir=where)
        t1 = time.perf_counter()
        del a
        return t1 - t0

    def floor() -> float:
        t0 = time.perf_counter()
        np.copyto(floor_dst, src)
        return time.perf_counter() - t0

    methods: dict[str, Callable[[], float]] = {
        SHARE_HUGE: lambda: share(mnt, False),
        SHARE_SHM_FRESH: lambda: share(None, False),
        SHARE_SHM_WARM: lambda: share(None, True),
        SHARE_HUGE_WARM: lambda: share(mnt, True),
        SHARE_ADVISE: lambda: share(os.path.join(mnt, "advise"), False),
        CREATE_HUGE: lambda: create(mnt),
        CREATE_SHM: lambda: create(None),
        FLOOR: floor,
    }
    quiet = Context(quick=False, cleanup=Cleanup(), verbose=False)
    try:
        samples, errors = interleave(quiet, methods, reps=reps, warmup=1)
    finally:
        pool.terminate()
        pool.join()
        idle_maps.set_budget(None)
    return {"samples": samples, "errors": errors, "pmd_kb": pmd[0]}


def _pmd_kb(a: Any) -> int:
    from shmarray._os import backend

    seg = a.segment
    st = os.stat(os.path.join(seg.dir, seg.native_key))
    return backend.huge_mapped_bytes(st.st_dev, st.st_ino) >> 10


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
