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

from .._harness import Context, GroupResult, Row, Worker, human_size, interleave, mem_available
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


def _first_attach(ctx: Context, res: GroupResult) -> None:
    """The first attach in a fresh process, at one size: bench_arrays.attach_samples (the arrays owner's).

    A spawned multiprocessing child (it inherits the parent's resource
    tracker) and a new interpreter (which starts its own), for shmarray, the
    stdlib and SharedArray; timed in the attaching process, name in, ndarray
    out; the new interpreter also with the library's import in the clock.
    """
    size = (1 << 20) if ctx.quick else (64 << 20)
    try:
        from .. import bench_arrays
    except ImportError as e:  # pragma: no cover - the module is part of the repository
        res.skipped.append(f"first attach in a fresh process: benchmarks.bench_arrays unavailable ({e})")
        return
    ctx.log(f"  first attach in a fresh process, {human_size(size)}: 3 methods x 2 kinds of process")
    try:
        got = bench_arrays.attach_samples([size], ctx.reps(9, 3))
    except Exception as e:  # noqa: BLE001 - reported, the group's other rows stand
        for m in (P.SHMARRAY, P.STDLIB):
            res.rows.append(Row(_fresh_label(m, "fresh process"), [], size=size,
                                role=ROLES.get(m, "peer"), error=f"{type(e).__name__}: {e}"[:300]))
        return
    for variant in FRESH_VARIANTS:
        for m in _FRESH_KINDS:
            samples = got.get((variant, m, size), [])
            if not samples and m == P.SHAREDARRAY:
                continue  # not installed: reported with the warm rows
            res.rows.append(Row(_fresh_label(m, variant), list(samples), size=size,
                                role=ROLES.get(m, "peer"), error="" if samples else "no samples"))
    res.notes.append(
        f"'first attach in a spawned child / new interpreter' (at {human_size(size)} only): the "
        "first attach of a fresh process, each sample a new process (benchmarks/bench_arrays.py). "
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
