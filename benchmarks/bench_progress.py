"""What ``progress=True`` costs: share() and create(fill=) with and without the bar.

Run ``python -m benchmarks.bench_progress [--size-mb N] [--repeats R]``.
``progress_samples`` is importable and returns plain samples (seconds).

Each sample makes a new segment of *size* bytes (so every call writes fresh
pages, the case a person waits for) and removes it after the clock stops.
The four methods run round-robin with the order rotated each round, after
one unrecorded round, so load drift on a shared machine hits them alike.
The bar is tqdm's real text bar (tqdm.auto outside Jupyter), written to
/dev/null instead of the terminal so that the run's output stays readable;
the formatting and the writes are all still done.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from .bench_arrays import _interleave, _tag

__all__ = ["progress_samples", "fixed_costs", "main"]


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def progress_samples(size: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of share()/create(fill=) of *size* bytes, progress off and on."""
    import shmarray

    src = np.ones(size // 8)  # touched once here, so the source side is warm in every sample

    def timed(call: Callable[[str], Any]) -> Callable[[], float]:
        def run() -> float:
            key = _tag("progress")
            with _stderr_to_devnull():
                start = time.perf_counter()
                arr = call(key)
                elapsed = time.perf_counter() - start
            if float(arr[-1]) != 1.0:
                raise AssertionError(f"{key}: wrong data written")
            arr.close()
            del arr
            gc.collect()
            return elapsed
        return run

    methods = {
        "share()": timed(lambda k: shmarray.share(k, src)),
        "share(progress=True)": timed(lambda k: shmarray.share(k, src, progress=True)),
        "create(fill=1.0)": timed(lambda k: shmarray.create(k, src.shape, fill=1.0)),
        "create(fill=1.0, progress=True)": timed(
            lambda k: shmarray.create(k, src.shape, fill=1.0, progress=True)),
    }
    return _interleave(methods, repeats)


def fixed_costs(loops: int = 2000) -> dict[str, float]:
    """Seconds per call of the pieces progress adds: the bar's own life, and the default path's extra work."""
    from tqdm.auto import tqdm

    from shmarray._progress import check_progress, reporting

    def write(data: memoryview, offset: int) -> None:
        pass

    def per_call(fn: Callable[[], Any], n: int) -> float:
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - start) / n)
        return statistics.median(samples)

    def bar() -> None:
        b = tqdm(total=512 << 20, desc="share 'x'", unit="B", unit_scale=True, unit_divisor=1024)
        for _ in range(8):
            b.update(64 << 20)
        b.close()

    def default_path() -> None:
        show = check_progress(False, "share array 'x'")
        with reporting(write, 512 << 20, "share 'x'", show) as w:
            w(memoryview(b""), 0)

    with _stderr_to_devnull():
        return {
            "tqdm bar: create, 8 updates, close": per_call(bar, loops // 20),
            "progress=False: check + reporting() around the writes": per_call(default_path, loops),
        }


def main(argv: list[str] | None = None) -> int:
    """Print medians, and each progress=True variant's ratio to the same call without it."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_progress",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="bytes per call (default 512 MiB)")
    p.add_argument("--repeats", type=int, default=9, help="samples per method (default 9)")
    args = p.parse_args(argv)
    import tqdm

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, tqdm {tqdm.__version__}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; {args.size_mb} MiB per call, "
          f"medians of {args.repeats} (interleaved)")
    res = progress_samples(args.size_mb << 20, args.repeats)
    med = {m: statistics.median(xs) for m, xs in res.items()}
    for m, xs in res.items():
        q = statistics.quantiles(xs, n=4)
        base = m.replace(", progress=True", "").replace("(progress=True)", "()")
        ratio = f"  {med[m] / med[base]:5.3f}x {base}" if base != m else ""
        print(f"  {m:34s} {med[m] * 1e3:8.1f} ms  (IQR {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})  "
              f"{(args.size_mb << 20) / med[m] / 1e9:4.2f} GB/s{ratio}")
    print("fixed costs, per call (medians of 5 loops):")
    for m, sec in fixed_costs().items():
        print(f"  {m:54s} {sec * 1e6:8.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
