"""Functions the notebooks run in worker processes.

A worker started with ``spawn`` (or ``forkserver``, Python 3.14's default on
Linux) imports the functions it runs by module and name, and a function
defined in a notebook cell lives in no importable module. So the notebooks
keep their worker code here, next to them; the kernel runs in this folder,
so ``import workers`` finds it, and so do the workers.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

import shmarray

if TYPE_CHECKING:
    import pandas


def warm(_: object = None) -> int:
    """Import what the tasks need and linger a moment, so every worker of a pool starts before timing."""
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    time.sleep(0.3)
    return os.getpid()


# -- 01-quickstart -------------------------------------------------------------------


def frame_sums(key: str, n: int) -> list[int]:
    """Attach the array *key* by name and sum its first *n* frames."""
    frames = shmarray.attach(key, readonly=True)
    with frames.lock(shared=True):
        return [int(f.sum()) for f in frames[:n]]


def brighten(frame: shmarray.SharedArray) -> int:
    """Add 1 to a frame in place; *frame* arrives as a reference (pickled key and offsets), not a copy."""
    with frame.lock():
        frame += 1
    return os.getpid()


def try_lock(key: str, timeout: float) -> str:
    """Try to take the segment lock of *key* within *timeout* seconds."""
    frames = shmarray.attach(key)
    try:
        with frames.lock(timeout=timeout):
            return "got the lock"
    except shmarray.LockError:
        return f"busy: still locked after {timeout} s"


# -- 03-pipeline ---------------------------------------------------------------------


def column_sums(part: np.ndarray) -> np.ndarray:
    """Per-column sums of a block of rows: a SharedArray slice (zero-copy) or a pickled ndarray."""
    return np.asarray(part.sum(axis=0))


def scale_rows(src: shmarray.SharedArray, dst: shmarray.SharedArray, factor: float) -> int:
    """Write ``src * factor`` into *dst*; both live in shared memory, so only two references travel."""
    np.multiply(src, factor, out=dst)
    return len(src)


def _revenue(frame: pandas.DataFrame, min_qty: int) -> pandas.Series:
    if min_qty > 1:
        frame = frame[frame["qty"] >= min_qty]
    return (frame["price"] * frame["qty"]).groupby(frame["symbol"]).sum()


def revenue_from_segment(key: str, start: int, stop: int, min_qty: int = 1) -> pandas.Series:
    """Revenue per symbol over rows [start, stop) of the table shared as *key*, trades of *min_qty* or more.

    The table is attached, not received: its buffers are the producer's
    segment, and ``to_pandas(split_blocks=True)`` keeps the numbers there.
    """
    table = shmarray.attach_table(key).slice(start, stop - start)
    return _revenue(table.to_pandas(split_blocks=True), min_qty)


def revenue_from_frame(frame: pandas.DataFrame, min_qty: int = 1) -> pandas.Series:
    """The same on a DataFrame that was pickled to this worker."""
    return _revenue(frame, min_qty)
