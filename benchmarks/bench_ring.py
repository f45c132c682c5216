"""Data-loader workers feeding a training loop: shmarray's BatchRing against a plain DataLoader.

Run ``python -m benchmarks.bench_ring [--batch 256] [--batches 16] [--repeats 5]``.
``pipeline_samples`` is importable and returns plain samples (seconds per
epoch); ``main`` prints medians and the ratio from one run.

The pipeline. A synthetic image dataset (each sample a 3 x 224 x 224 uint8
image taken from a small pool made up front, plus an int64 label, so that
making samples costs next to nothing and the figure is the data path), read
by ``num_workers`` spawned worker processes (persistent, warmed by an
unrecorded epoch), ``batch`` samples per batch. The consumer does the same
work on every batch in both pipelines: one copy of the images into a
preallocated tensor (standing in for the host-to-device copy, which reads
every byte) and a sum of the labels (checked against the expected total),
with one torch thread.

dataloader
    ``torch.utils.data.DataLoader`` with its default collate: each worker
    stacks the batch into a fresh shared-memory tensor (new pages, first
    touch every batch), the main process maps it from a passed fd.
ring
    ``shmarray.ring_loader`` (fields inferred from the first sample): the
    same DataLoader and workers, whose collate stacks each batch into a slot
    of a ring created once (warm pages) and returns a token; the consumer
    gets ``torch.from_numpy`` views of the slot (no copy) and the slot is
    reused once nothing references its batch any more.
dataloader, every batch kept / ring, every batch kept
    the same two pipelines, the consumer keeping every batch of the epoch
    in a list (as ``list(loader)`` or a list of validation outputs does) and
    checking, after the epoch, that every kept batch still holds its labels.
    The ring then moves each kept batch out of its slot (one copy into
    private memory): that copy's cost, against the DataLoader, whose batches
    are private already. Dropping the kept list is not timed.
floor: consumer work alone
    the consumer's copy and sum on a batch already in memory, per epoch.

Methods alternate epoch by epoch (order rotated each round) so load drift
on a shared machine hits both alike. A sample is one epoch of ``batches``
batches; batches/s = batches / median.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from typing import Any, Callable

import numpy as np

__all__ = ["SyntheticImages", "pipeline_samples", "main"]


class SyntheticImages:
    """*n* samples ``{"images": uint8[3, H, W], "labels": i}``; images come from a pool of 8."""

    def __init__(self, n: int, shape: tuple[int, ...] = (3, 224, 224), seed: int = 0) -> None:
        self.n = n
        self.shape = shape
        self.pool = np.random.default_rng(seed).integers(0, 256, size=(8, *shape), dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"images": self.pool[i % len(self.pool)], "labels": i}


def _consumer(batch_size: int, shape: tuple[int, ...]) -> Callable[[Any], int]:
    import torch

    dst = torch.empty((batch_size, *shape), dtype=torch.uint8)

    def consume(batch: Any) -> int:
        images = batch["images"]
        dst[: images.shape[0]].copy_(images)
        return int(batch["labels"].sum())

    return consume


def _epoch(loader: Any, consume: Callable[[Any], int], expect: int) -> float:
    t0 = time.perf_counter()
    total = 0
    for batch in loader:
        total += consume(batch)
    dt = time.perf_counter() - t0
    if total != expect:
        raise AssertionError(f"labels summed to {total}, expected {expect}: a batch was lost or duplicated")
    return dt


def _epoch_kept(loader: Any, consume: Callable[[Any], int], expect: int) -> float:
    t0 = time.perf_counter()
    kept = []
    for batch in loader:
        consume(batch)
        kept.append(batch)
    total = sum(int(b["labels"].sum()) for b in kept)  # after the epoch: did any kept batch change?
    dt = time.perf_counter() - t0
    del kept
    if total != expect:
        raise AssertionError(f"kept batches' labels summed to {total}, expected {expect}: a kept batch changed")
    return dt


def pipeline_samples(*, batch: int = 256, batches: int = 16, workers: int = 2, repeats: int = 5,
                     shape: tuple[int, ...] = (3, 224, 224), prefetch: int = 2,
                     context: str = "spawn",
                     log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per epoch of *batches* batches, per method (see the module docstring)."""
    import torch
    from torch.utils.data import DataLoader

    import shmarray

    log = log or (lambda msg: None)
    # One intra-op thread: on a few cores torch's parallel copy mostly waits for
    # its helper threads to wake up (8 ms vs 80 ms for 37 MB here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = batch * batches
    ds = SyntheticImages(n, shape)
    expect = n * (n - 1) // 2
    consume = _consumer(batch, shape)
    plain = DataLoader(ds, batch_size=batch, num_workers=workers, prefetch_factor=prefetch,
                       persistent_workers=True, multiprocessing_context=context)
    key = f"shmbench-{os.getpid()}-ring-{secrets.token_hex(6)}"
    ring = shmarray.ring_loader(ds, batch_size=batch, num_workers=workers, prefetch_factor=prefetch, key=key,
                                persistent_workers=True, multiprocessing_context=context)
    one = {"images": torch.from_numpy(np.stack([ds.pool[i % 8] for i in range(batch)])),
           "labels": torch.arange(batch)}
    methods: dict[str, Callable[[], float]] = {
        "dataloader": lambda: _epoch(plain, consume, expect),
        "ring": lambda: _epoch(ring, consume, expect),
        "dataloader, every batch kept": lambda: _epoch_kept(plain, consume, expect),
        "ring, every batch kept": lambda: _epoch_kept(ring, consume, expect),
        "floor: consumer work alone": lambda: _floor(one, consume, batches),
    }
    out: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    try:
        for rnd in range(-1, repeats):  # round -1 starts and warms the workers
            k = rnd % len(names)
            for m in names[k:] + names[:k]:
                dt = methods[m]()
                if rnd >= 0:
                    out[m].append(dt)
            if rnd >= 0:
                log(f"  round {rnd}: " + ", ".join(f"{m} {out[m][-1]:.3f} s" for m in names))
    finally:
        torch.set_num_threads(threads)
        ring.close()  # the DataLoaders' persistent workers exit when the loaders are collected
    return out


def _floor(one: dict[str, Any], consume: Callable[[Any], int], batches: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batches):
        consume(one)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Print medians (batches/s) and the ring / DataLoader ratio from one run."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_ring", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="samples per batch (default 256)")
    p.add_argument("--batches", type=int, default=16, help="batches per timed epoch (default 16)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per method (default 5)")
    p.add_argument("--size", type=int, default=224, help="image height and width (default 224)")
    args = p.parse_args(argv)
    shape = (3, args.size, args.size)
    mb = args.batch * int(np.prod(shape)) / 2**20
    print(f"batch {args.batch} x {shape} uint8 ({mb:.1f} MiB) + int64 labels, {args.batches} batches per "
          f"epoch, {args.workers} spawned workers, {args.repeats} epochs per method, {os.cpu_count()} cores")
    samples = pipeline_samples(batch=args.batch, batches=args.batches, workers=args.workers,
                               repeats=args.repeats, shape=shape, log=print)
    med = {m: statistics.median(v) for m, v in samples.items()}
    print(f"{'method':30} {'batches/s':>10} {'GB/s':>7} {'min..max s/epoch':>20}")
    for m, v in samples.items():
        rate = args.batches / med[m]
        print(f"{m:30} {rate:10.1f} {rate * mb * 2**20 / 1e9:7.2f} {min(v):9.3f}..{max(v):.3f}")
    ratio = med["dataloader"] / med["ring"]
    print(f"ring / dataloader batches/s: {ratio:.2f}x (aim: >= 1.5x)")
    kept = med["dataloader, every batch kept"] / med["ring, every batch kept"]
    print(f"every batch kept, ring / dataloader batches/s: {kept:.2f}x")
    print(f"ring, every batch kept / ring: {med['ring'] / med['ring, every batch kept']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
