"""Worker-to-GPU bytes/s: a pinned BatchRing against ``DataLoader(pin_memory=True)``. Needs a CUDA GPU.

Run on a GPU machine::

    python -m benchmarks.gpu_pinned [--size-mb 1024] [--batch 256] [--batches 16] [--repeats 5]
    python -m benchmarks.gpu_pinned --device cpu --size-mb 64 --batch 16   # checks the script anywhere

Part 1, host to device from one /dev/shm segment of ``--size-mb`` (pages
touched first), into a preallocated device buffer, synchronised:

pageable
    ``dst.copy_(torch.from_numpy(segment view))``: the driver stages the
    copy through its own small pinned buffers.
staged
    the DataLoader ``pin_memory`` path: copy into a pinned torch buffer,
    then ``non_blocking`` to the device.
registered
    ``Segment.pin()`` once (``cudaHostRegister``), then ``non_blocking`` to
    the device straight from the shared mapping.
registration
    the time of ``pin()`` + ``unpin()`` of the segment (reported apart).

Part 2, the pipeline of ``benchmarks/bench_ring.py`` (synthetic 3 x 224 x
224 uint8 images, spawned persistent workers), with a consumer that copies
each batch's images into a device buffer (``non_blocking``) and
synchronises: ``DataLoader(pin_memory=True)`` (workers -> shared memory ->
pin-memory thread copies into pinned memory -> GPU) against
``ring_loader(pin=True)`` (workers -> pinned ring slot -> GPU) and an
unpinned ring. Figures are image bytes per second.

Measured on one H100 (benchmarks/results/gpu_pinned_h100.md), 1 GiB from
a /dev/shm segment: pageable 7.9 GB/s, staged 22.7 GB/s, registered
54.9 GB/s, registration 34 ms; the pinned ring 4.65x the DataLoader. ``--device cpu`` runs every path without CUDA (no
pinning, copies into host memory) only to check that the script works;
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from .bench_ring import SyntheticImages

__all__ = ["h2d_samples", "pipeline_to_device_samples", "main"]


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rounds(methods: dict[str, Callable[[], float]], repeats: int,
            log: Callable[[str], None]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for rnd in range(-1, repeats):  # round -1 warms up
        k = rnd % len(names)
        for m in names[k:] + names[:k]:
            dt = methods[m]()
            if rnd >= 0:
                out[m].append(dt)
        if rnd >= 0:
            log(f"  round {rnd}: " + ", ".join(f"{m} {out[m][-1] * 1e3:.1f} ms" for m in names))
    return out


def h2d_samples(size: int, dev: Any, repeats: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Seconds per host-to-device copy of *size* bytes from a /dev/shm segment, per path."""
    import torch

    import shmarray

    key = f"shmbench-{os.getpid()}-gpu-{secrets.token_hex(6)}"
    seg = shmarray.Segment(key).create(size)
    try:
        host = np.frombuffer(seg.data, np.uint8)  # type: ignore[arg-type]
        host[:] = 1  # touch every page first
        src = torch.from_numpy(host)
        dst = torch.empty(size, dtype=torch.uint8, device=dev)
        cuda = dev.type == "cuda"
        staging = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)

        def pageable() -> float:
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(dev)
            return time.perf_counter() - t0

        def staged() -> float:
            t0 = time.perf_counter()
            staging.copy_(src)
            dst.copy_(staging, non_blocking=True)
            _sync(dev)
            return time.perf_counter() - t0

        def registered() -> float:
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            _sync(dev)
            return time.perf_counter() - t0

        def registration() -> float:
            seg.unpin()
            t0 = time.perf_counter()
            seg.pin()
            return time.perf_counter() - t0

        methods: dict[str, Callable[[], float]] = {"pageable": pageable, "staged": staged}
        samples = _rounds(methods, repeats, log)
        if cuda:
            seg.pin()
            more = {"registered": registered, "registration (pin)": registration}
            samples.update(_rounds(more, repeats, log))
            seg.unpin()
        return samples
    finally:
        seg.unlink()
        seg.detach()


def pipeline_to_device_samples(*, batch: int, batches: int, workers: int, repeats: int, dev: Any,
                               log: Callable[[str], None]) -> dict[str, list[float]]:
    """Seconds per epoch of *batches* batches from the workers into device memory, per pipeline."""
    import torch
    from torch.utils.data import DataLoader

    import shmarray

    shape = (3, 224, 224)
    cuda = dev.type == "cuda"
    n = batch * batches
    ds = SyntheticImages(n, shape)
    dst = torch.empty((batch, *shape), dtype=torch.uint8, device=dev)
    torch.set_num_threads(1)

    def epoch(loader: Any) -> float:
        t0 = time.perf_counter()
        for b in loader:
            images = b["images"]
            dst[: images.shape[0]].copy_(images, non_blocking=True)
            _sync(dev)  # before the batch's host memory is reused
        return time.perf_counter() - t0

    common: dict[str, Any] = {"num_workers": workers, "persistent_workers": True,
                              "multiprocessing_context": "spawn"}
    fields = {"images": (shape, np.uint8), "labels": ((), np.int64)}
    plain = DataLoader(ds, batch_size=batch, pin_memory=cuda, **common)
    tag = f"shmbench-{os.getpid()}"
    pinned = shmarray.ring_loader(ds, fields, batch, key=f"{tag}-gpuring-{secrets.token_hex(6)}",
                                  pin=cuda, **common)
    unpinned = shmarray.ring_loader(ds, fields, batch, key=f"{tag}-gpuring-{secrets.token_hex(6)}", **common)
    try:
        return _rounds({
            "dataloader pin_memory=True": lambda: epoch(plain),
            "ring, pinned" if cuda else "ring (cpu check)": lambda: epoch(pinned),
            "ring, not pinned": lambda: epoch(unpinned),
        }, repeats, log)
    finally:
        pinned.close()
        unpinned.close()


def main(argv: list[str] | None = None) -> int:
    """Print medians and ratios of both parts; exit status 2 when CUDA is missing (unless --device cpu)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pinned", description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="part 1 copy size in MiB (default 1024)")
    p.add_argument("--batch", type=int, default=256, help="part 2 samples per batch (default 256)")
    p.add_argument("--batches", type=int, default=16, help="part 2 batches per epoch (default 16)")
    p.add_argument("--workers", type=int, default=2, help="part 2 DataLoader workers (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per method (default 5)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    args = p.parse_args(argv)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu to check the script)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (script check only)"
    print(f"device: {name}; torch {torch.__version__}; shmarray pins through "
          f"{__import__('shmarray._cuda', fromlist=['x']).backend_name()}")
    size = args.size_mb << 20
    print(f"part 1: host to device, {args.size_mb} MiB from a /dev/shm segment")
    h2d = h2d_samples(size, dev, args.repeats, print)
    for m, v in h2d.items():
        med = statistics.median(v)
        rate = "" if m.startswith("registration") else f"{size / med / 1e9:8.2f} GB/s"
        print(f"  {m:22} {med * 1e3:9.2f} ms {rate}")
    if "registered" in h2d:
        r = statistics.median(h2d["registered"])
        print(f"  registered / staged: {statistics.median(h2d['staged']) / r:.2f}x, "
              f"registered / pageable: {statistics.median(h2d['pageable']) / r:.2f}x")
    print(f"part 2: pipeline, batch {args.batch} x 3 x 224 x 224 uint8, {args.batches} batches per epoch, "
          f"{args.workers} spawned workers")
    pipe = pipeline_to_device_samples(batch=args.batch, batches=args.batches, workers=args.workers,
                                      repeats=args.repeats, dev=dev, log=print)
    nbytes = args.batch * args.batches * 3 * 224 * 224
    for m, v in pipe.items():
        med = statistics.median(v)
        print(f"  {m:28} {args.batches / med:8.1f} batches/s {nbytes / med / 1e9:8.2f} GB/s")
    base = statistics.median(pipe["dataloader pin_memory=True"])
    for m, v in pipe.items():
        if m.startswith("ring"):
            print(f"  {m} / dataloader pin_memory=True: {base / statistics.median(v):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
