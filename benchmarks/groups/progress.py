"""progress: what ``progress=True`` costs: share() and create(fill=) with and without the bar.

Each sample makes a new segment of the size (so every call writes fresh
pages, the case a person waits for) and removes it after the clock stops.
The bar is tqdm's real text bar (tqdm.auto outside Jupyter), written to
/dev/null instead of the terminal so that the run's output stays readable;
the formatting and the writes are all still done. Also the fixed costs per
call: one bar's life (create, 8 updates, close) and what the default path
(``progress=False``) adds around the writes, each a loop of calls divided by
its length. 512 MiB (16 MiB in --quick).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from .._harness import Context, GroupResult, Row, have, human_size, interleave
from . import _peers as P

NAME = "progress"
TITLE = "progress=True: share() and create(fill=) with and without the bar"

SHARE = "share()"
SHARE_BAR = "share(progress=True)"
FILL = "create(fill=1.0)"
FILL_BAR = "create(fill=1.0, progress=True)"
BAR = "tqdm bar: create, 8 updates, close"
DEFAULT = "progress=False: check + reporting() around the writes"


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def run(ctx: Context) -> GroupResult:
    """Measure each call with and without the bar, then the fixed costs per call."""
    import shmarray

    res = GroupResult(NAME, TITLE)
    if not have("tqdm"):
        res.rows.append(Row(SHARE_BAR, [], role="shmarray", error="tqdm is not installed"))
        return res
    size = P.big_size(res, ctx.quick, 16 << 20, copies=3)
    variant = human_size(size)
    src = np.ones(size // 8)  # touched once here, so the source side is warm in every sample

    def timed(call: Callable[[str], Any]) -> Callable[[], float]:
        def one() -> float:
            key = ctx.cleanup.name("progress")

            def undo() -> None:
                try:
                    shmarray.unlink(key)
                except shmarray.NotFoundError:
                    pass

            h = ctx.cleanup.add(key, undo)
            try:
                with _stderr_to_devnull():
                    t0 = time.perf_counter()
                    arr = call(key)
                    t1 = time.perf_counter()
                if float(arr[-1]) != 1.0:
                    raise RuntimeError(f"{key}: wrong data written")
                arr.close()
                del arr
            finally:
                ctx.cleanup.done(h)
            return t1 - t0
        return one

    methods = {
        SHARE: timed(lambda k: shmarray.share(k, src)),
        SHARE_BAR: timed(lambda k: shmarray.share(k, src, progress=True)),
        FILL: timed(lambda k: shmarray.create(k, src.shape, fill=1.0)),
        FILL_BAR: timed(lambda k: shmarray.create(k, src.shape, fill=1.0, progress=True)),
    }
    reps = ctx.reps(9, 3)
    ctx.log(f"  {variant}: {len(methods)} methods x {reps}")
    samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    for m in methods:
        res.rows.append(Row(m, samples[m], variant=variant, role="shmarray", error=errors.get(m, ""),
                            extra={"bytes": size}))

    fixed = "fixed cost per call"
    f_samples, f_errors = interleave(ctx, _fixed_costs(200 if ctx.quick else 2000), reps=ctx.reps(7, 3), warmup=1)
    for m in (BAR, DEFAULT):
        res.rows.append(Row(m, f_samples[m], variant=fixed, role="shmarray", error=f_errors.get(m, "")))
    res.notes.append(
        "Each progress=True row against the same call without it, same run. Fixed costs: each sample is a "
        "loop of calls divided by its length (the bar's loop a twentieth as long)."
    )
    for ours, base in ((SHARE_BAR, SHARE), (FILL_BAR, FILL)):
        a, b = res.median(ours, variant=variant), res.median(base, variant=variant)
        ok = a is not None and b is not None and b > 0
        res.headline(f"progress: {ours} time / {base} time", a / b if ok else None,  # type: ignore[operator]
                     "informational", None,
                     f"{variant}: {a * 1e3:.1f} ms vs {b * 1e3:.1f} ms" if ok else "not measured")  # type: ignore[operator]
    return res


def _fixed_costs(loops: int) -> dict[str, Callable[[], float]]:
    """Seconds per call of the pieces progress adds: the bar's own life, and the default path's extra work."""
    from tqdm.auto import tqdm

    from shmarray._progress import check_progress, reporting

    def write(data: memoryview, offset: int) -> None:
        pass

    def per_call(fn: Callable[[], Any], n: int) -> Callable[[], float]:
        def one() -> float:
            with _stderr_to_devnull():
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                return (time.perf_counter() - t0) / n
        return one

    def bar() -> None:
        b = tqdm(total=512 << 20, desc="share 'x'", unit="B", unit_scale=True, unit_divisor=1024)
        for _ in range(8):
            b.update(64 << 20)
        b.close()

    def default_path() -> None:
        show = check_progress(False, "share array 'x'")
        with reporting(write, 512 << 20, "share 'x'", show) as w:
            w(memoryview(b""), 0)

    return {BAR: per_call(bar, max(1, loops // 20)), DEFAULT: per_call(default_path, loops)}
