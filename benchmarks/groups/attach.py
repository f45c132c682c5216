"""attach: name -> ndarray in a warm process, 1 MiB to 1 GiB.

The segments are made here once per size (untimed). A worker process that is
already running, with every module imported, waits on a pipe; each sample
is one attach there, timed in the worker from the call to the ready ndarray
(so the pipe's wake-up is not in it). The array is dropped and closed after
the clock stops. Mapping is lazy, so a good attach is flat in size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .._harness import (Context, GroupResult, Row, Worker, human_size, interleave, mem_available,
                        recording)
from . import _peers as P

NAME = "attach"
TITLE = "Attach: name -> ndarray in a warm process and in a fresh one"

LABELS = {
    P.SHMARRAY: "shmarray.attach",
    P.SEGMENT: "shmarray Segment.attach + np.frombuffer (no header)",
    P.STDLIB: "stdlib SharedMemory(name) + np.ndarray",
    P.POSIX: "posix_ipc + mmap + np.frombuffer",
    P.SHAREDARRAY: "SharedArray.attach (C)",
}
ROLES = {P.SHMARRAY: "shmarray", P.SEGMENT: "shmarray"}


def sizes(ctx: Context) -> list[int]:
    """1 MiB .. 1 GiB (quick: 1 MiB and 64 MiB), leaving out what memory cannot hold."""
    full = [1 << 20, 8 << 20, 64 << 20, 256 << 20, 1 << 30]
    chosen = [1 << 20, 64 << 20] if ctx.quick else full
    # Segments are created zero-filled, one method at a time: keep 2x headroom.
    return [s for s in chosen if 2 * s < mem_available()]


def run(ctx: Context) -> GroupResult:
    """Measure every attach method at every size."""
    res = GroupResult(NAME, TITLE)
    methods = [P.SHMARRAY, P.SEGMENT, P.STDLIB, P.POSIX, P.SHAREDARRAY]
    live = []
    for m in methods:
        why = P.peer_missing(m)
        if why is None:
            live.append(m)
        elif m == P.SHMARRAY:
            res.rows.append(Row(LABELS[m], [], size=None, role="shmarray", error=why))
        else:
            res.skipped.append(f"{LABELS[m]}: {why}")
    reps = ctx.reps(31, 9)
    dtype = np.dtype(np.float64)
    with Worker() as w:
        w.call(P.import_in_worker, "numpy", "shmarray", "posix_ipc", "SharedArray",
               "multiprocessing.shared_memory")
        for size in sizes(ctx):
            shape = (size // dtype.itemsize,)
            meta: P.Meta = (shape, dtype.str)
            made: dict[str, P.Made] = {}
            errors: dict[str, str] = {}
            try:
                for m in live:
                    try:
                        made[m] = P.make(m, ctx.cleanup.name(f"att{m[:3]}"), ctx.cleanup, None, shape, dtype)
                    except Exception as e:  # noqa: BLE001 - reported as the method's failure
                        errors[m] = f"creating the segment failed: {type(e).__name__}: {e}"
                ctx.log(f"  {human_size(size)}: {len(made)} methods x {reps} attaches")

                def one(m: str, name: str) -> Callable[[], float]:
                    return lambda: float(w.call(P.attach_in_worker, m, name, meta))

                names = {m: made[m].name for m in made}
                samples, errs = interleave(ctx, {m: one(m, names[m]) for m in made}, reps=reps, warmup=2)
                errors.update(errs)
            finally:
                for mk in made.values():
                    mk.release()
            for m in live:
                res.rows.append(Row(LABELS[m], samples.get(m, []) if m in made else [], size=size,
                                    role=ROLES.get(m, "peer"), error=errors.get(m, "")))
    _first_attach(ctx, res)
    _headline(res)
    return res


FRESH_VARIANTS = ("spawned child", "new interpreter", "new interpreter, import included")
_FRESH_KINDS = (P.SHMARRAY, P.STDLIB, P.SHAREDARRAY)


def _fresh_label(m: str, variant: str) -> str:
    return f"{LABELS[m]}, first attach in a {variant}"


# One attach in a new interpreter, printed as two numbers: the attach alone
# (numpy and the library imported before the clock starts) and the library's
# import plus the attach (numpy, which every method needs, still before it).
_FRESH = r"""
import sys, time
import numpy as np
method, name, dtype = sys.argv[1], sys.argv[2], sys.argv[4]
shape = tuple(int(x) for x in sys.argv[3].split(",") if x)
t_import = time.perf_counter()
if method == "shmarray":
    import shmarray
elif method == "SharedArray":
    import SharedArray
else:
    from multiprocessing import resource_tracker, shared_memory
t0 = time.perf_counter()
if method == "shmarray":
    arr = shmarray.attach(name)
elif method == "SharedArray":
    arr = SharedArray.attach("shm://" + name)
else:
    shm = shared_memory.SharedMemory(name)
    arr = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
t1 = time.perf_counter()
if method == "stdlib":
    resource_tracker.unregister(shm._name, "shared_memory")
print(t1 - t0, t1 - t_import)
"""


def _first_attach(ctx: Context, res: GroupResult) -> None:
    """The first attach in a fresh process, at one size, each sample a new process.

    A spawned multiprocessing child (it inherits the parent's resource
    tracker) and a new interpreter (which starts its own), for shmarray, the
    stdlib and SharedArray; timed in the attaching process, name in, ndarray
    out; the new interpreter also with the library's import in the clock.
    """
    import os
    import subprocess
    import sys
    import tempfile
    from multiprocessing import resource_tracker

    size = (1 << 20) if ctx.quick else (64 << 20)
    kinds = [m for m in _FRESH_KINDS if P.peer_missing(m) is None]
    ctx.log(f"  first attach in a fresh process, {human_size(size)}: {len(kinds)} methods x 2 kinds of process")
    resource_tracker.ensure_running()  # as in any program that uses multiprocessing: children inherit it
    # New interpreters import from bytecode, as an installed package does: a
    # cache of their own (the unrecorded warm-up round fills it), even where
    # PYTHONDONTWRITEBYTECODE is set, so that no sample compiles a module.
    pycache = tempfile.TemporaryDirectory(prefix="shmbench-pycache-")
    fresh_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    fresh_env["PYTHONPYCACHEPREFIX"] = pycache.name
    shape = (size // 8,)
    shape_arg = ",".join(map(str, shape))
    meta: P.Meta = (shape, "<f8")
    made: dict[str, P.Made] = {}
    with_import: dict[str, list[float]] = {m: [] for m in kinds}

    def spawned(m: str) -> Callable[[], float]:
        def one() -> float:
            with Worker() as fresh:
                fresh.call(P.import_in_worker, "numpy", "shmarray", "multiprocessing.shared_memory", "SharedArray")
                return float(fresh.call(P.attach_in_worker, m, made[m].name, meta))
        return one

    def interpreter(m: str) -> Callable[[], float]:
        def one() -> float:
            r = subprocess.run([sys.executable, "-c", _FRESH, m, made[m].name, shape_arg, "<f8"],
                               capture_output=True, text=True, timeout=60, env=fresh_env)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            alone, both = r.stdout.split()[:2]
            if recording():
                with_import[m].append(float(both))
            return float(alone)
        return one

    try:
        for m in kinds:
            made[m] = P.make(m, ctx.cleanup.name(f"fat{m[:3]}"), ctx.cleanup, None, shape, np.dtype(np.float64))
        methods: dict[str, Callable[[], float]] = {}
        for m in kinds:
            methods[f"spawned child|{m}"] = spawned(m)
            methods[f"new interpreter|{m}"] = interpreter(m)
        # block=1: every call is a new process, the first of its kind; none is dropped.
        samples, errors = interleave(ctx, methods, reps=ctx.reps(9, 3), warmup=1, block=1)
    finally:
        for mk in made.values():
            mk.release()
        pycache.cleanup()
    for variant in FRESH_VARIANTS:
        for m in kinds:
            if variant == "new interpreter, import included":
                got, err = with_import[m], errors.get(f"new interpreter|{m}", "")
            else:
                got, err = samples[f"{variant}|{m}"], errors.get(f"{variant}|{m}", "")
            res.rows.append(Row(_fresh_label(m, variant), list(got), size=size, role=ROLES.get(m, "peer"),
                                error=err or ("" if got else "no samples")))
    res.notes.append(
        f"'first attach in a spawned child / new interpreter' (at {human_size(size)} only): the "
        "first attach of a fresh process, each sample a new process (so no call of a block is dropped). "
        "A new interpreter's first stdlib attach starts its own resource tracker. 'import included' "
        "puts the library's import (not numpy's) inside the clock: what a fresh worker pays in all."
    )


def _headline(res: GroupResult) -> None:
    """The issue's aims are for an attach in a fresh process; the warm figures are headlined too."""
    ours = LABELS[P.SHMARRAY]
    fresh = [r for r in res.rows if r.method == _fresh_label(P.SHMARRAY, "new interpreter")]
    if fresh and fresh[0].size is not None:
        size = fresh[0].size
        a = res.median(_fresh_label(P.SHMARRAY, "new interpreter"), size)
        b = res.median(_fresh_label(P.STDLIB, "new interpreter"), size)
        c = res.median(_fresh_label(P.SHAREDARRAY, "new interpreter"), size)
        ok = a is not None and b is not None and a > 0
        res.headline("attach in a fresh process: stdlib time / shmarray time", b / a if ok else None, ">= 2",
                     (b / a >= 2) if ok else None,
                     f"new interpreter, {human_size(size)}: shmarray {_us(a)}, stdlib {_us(b)}")
        ok = a is not None and c is not None and c > 0
        res.headline("attach in a fresh process: shmarray time / SharedArray time", a / c if ok else None,
                     "<= 1.5", (a / c <= 1.5) if ok else None,
                     f"new interpreter, {human_size(size)}: shmarray {_us(a)}, SharedArray {_us(c)}"
                     if ok else "SharedArray not measured")
    szs = sorted({r.size for r in res.rows if r.size is not None and r.method in LABELS.values()})

    std = res.ratios(ours, LABELS[P.STDLIB], szs)
    if std:
        worst = min(std, key=lambda x: x[1])
        res.headline("attach in a warm process: stdlib time / shmarray time", worst[1], ">= 2", worst[1] >= 2,
                     f"worst size {human_size(worst[0])}; all: {_each(std)}")
    else:
        res.headline("attach in a warm process: stdlib time / shmarray time", None, ">= 2", None, "not measured")
    sa = res.ratios(ours, LABELS[P.SHAREDARRAY], szs)
    if sa:
        inv = [(s, 1 / r) for s, r in sa]  # shmarray / SharedArray
        worst = max(inv, key=lambda x: x[1])
        res.headline("attach in a warm process: shmarray time / SharedArray time", worst[1], "<= 1.5",
                     worst[1] <= 1.5, f"worst size {human_size(worst[0])}; all: {_each(inv)}")
    else:
        res.headline("attach in a warm process: shmarray time / SharedArray time", None, "<= 1.5", None,
                     "not measured" if any(r.method == LABELS[P.SHAREDARRAY] for r in res.rows)
                     else "SharedArray not installed")
    meds = [(s, res.median(ours, s)) for s in szs]
    meds = [(s, m) for s, m in meds if m is not None]
    if len(meds) >= 2:
        flat = max(m for _, m in meds) / min(m for _, m in meds)
        res.headline("attach: flat in size (slowest size / fastest size, shmarray)", flat, "<= 1.5",
                     flat <= 1.5,
                     ", ".join(f"{human_size(s)} {m * 1e6:.0f} us" for s, m in meds))


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e6:.0f} us"


def _each(ratios: list[tuple[int, float]]) -> str:
    return ", ".join(f"{human_size(s)} {r:.2f}x" for s, r in ratios)
