"""``shmarray demo``: worker processes share one segment and count under its lock."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import struct
import time

from ._segment import Segment

_COUNTER = struct.Struct("<Q")


def _worker(key: str, iterations: int) -> None:
    with Segment(key).attach() as seg:
        data = seg.data
        assert data is not None
        for _ in range(iterations):
            with seg.locked():
                (n,) = _COUNTER.unpack_from(data, 0)
                _COUNTER.pack_into(data, 0, n + 1)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when the count is exact."""
    key = f"shmarray-demo-{secrets.token_hex(4)}"
    ctx = mp.get_context("spawn")
    with Segment(key).create(4096) as seg:
        print(f"created segment {key!r} ({seg.size} bytes) as /dev/shm/{seg.native_key}")
        procs = [ctx.Process(target=_worker, args=(key, args.iterations)) for _ in range(args.workers)]
        start = time.perf_counter()
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
        elapsed = time.perf_counter() - start
        data = seg.data
        assert data is not None
        (count,) = _COUNTER.unpack_from(data, 0)
        want = args.workers * args.iterations
        print(f"{args.workers} processes x {args.iterations} locked increments: counter = {count} "
              f"(expected {want}) in {elapsed:.2f} s")
    print("detached: the segment is gone" if not _exists(key) else "segment still there!")
    return 0 if count == want else 1


def _exists(key: str) -> bool:
    try:
        Segment(key).attach().detach()
    except FileNotFoundError:
        return False
    return True
