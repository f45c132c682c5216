"""ring: data-loader workers feeding a training loop, ``shmarray.ring_loader`` against torch's ``DataLoader``.

The pipeline. A synthetic image dataset (each sample a 3 x H x W uint8
image taken from a small pool made up front, plus an int64 label, so that
making samples costs next to nothing and the figure is the data path), read
by ``num_workers`` spawned worker processes (persistent, started and warmed
by the unrecorded warm-up epoch), ``batch`` samples per batch. The consumer
does the same work on every batch in every pipeline: one copy of the images
into a preallocated tensor (standing in for the host-to-device copy, which
reads every byte) and a sum of the labels (checked against the expected
total), with one torch thread.

DataLoader
    ``torch.utils.data.DataLoader`` with its default collate: each worker
    stacks the batch into a fresh shared-memory tensor (new pages, first
    touch every batch), the main process maps it from a passed fd.
ring_loader
    ``shmarray.ring_loader`` (fields inferred from the first sample): the
    same DataLoader and workers, whose collate stacks each batch into a slot
    of a ring created once (warm pages) and returns a token; the consumer
    gets ``torch.from_numpy`` views of the slot (no copy) and the slot is
    reused once nothing references its batch any more.
every batch kept (second column)
    the same two pipelines, the consumer keeping every batch of the epoch in
    a list (as ``list(loader)`` or a list of validation outputs does) and
    checking, after the epoch, that every kept batch still holds its labels.
    The ring then moves each kept batch out of its slot (one copy into
    private memory): that copy's cost, against the DataLoader, whose batches
    are private already. Dropping the kept list is not timed.
floor: the consumer's work alone
    the consumer's copy and sum on a batch already in memory, per epoch.

A sample is one epoch of ``batches`` batches (seconds); batches/s =
batches / median. All five methods go through one ``interleave``: blocks
of epochs (the first of each block dropped), the order rotated each round.
Full: batch 256 of 3 x 224 x 224 uint8 (36.8 MiB), 16 batches per epoch,
2 workers, 9 epochs per method; --quick: batch 16 of 3 x 32 x 32, 4
batches, 2 workers, 3 epochs (the spawned workers' torch import, a few
seconds, is most of the quick run's cost). ``SyntheticImages`` lives here:
spawned DataLoader workers unpickle it by this module's path (the ``gpu``
group uses it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._harness import Context, GroupResult, Row, have, interleave

__all__ = ["NAME", "TITLE", "SyntheticImages", "run"]

NAME = "ring"
TITLE = "Data-loader pipeline: ring_loader against torch's DataLoader (epochs of batches)"

LOADER = "torch DataLoader (default collate)"
RING = "shmarray.ring_loader"
FLOOR = "floor: the consumer's work alone"
DROPPED = "batches dropped each step"
KEPT = "every batch kept"


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


def _epoch(loader: Any, consume: Callable[[Any], int], expect: int) -> Callable[[], float]:
    def one() -> float:
        t0 = time.perf_counter()
        total = 0
        for batch in loader:
            total += consume(batch)
        dt = time.perf_counter() - t0
        if total != expect:
            raise AssertionError(f"labels summed to {total}, expected {expect}: a batch was lost or duplicated")
        return dt
    return one


def _epoch_kept(loader: Any, consume: Callable[[Any], int], expect: int) -> Callable[[], float]:
    def one() -> float:
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
    return one


def _floor(one: dict[str, Any], consume: Callable[[Any], int], batches: int) -> Callable[[], float]:
    def floor() -> float:
        t0 = time.perf_counter()
        for _ in range(batches):
            consume(one)
        return time.perf_counter() - t0
    return floor


def _stop_workers(loader: Any) -> None:
    """End a persistent DataLoader's workers now rather than whenever the loader is collected."""
    it = getattr(loader, "_iterator", None)
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


def run(ctx: Context) -> GroupResult:
    """Epochs of the four pipelines and the floor, interleaved; batches/s and ratios from the medians."""
    res = GroupResult(NAME, TITLE)
    if not have("torch"):
        res.rows.append(Row(RING, [], variant=DROPPED, role="shmarray", error="torch is not installed"))
        res.skipped.append(f"{LOADER}: torch is not installed")
        return res
    import torch
    from torch.utils.data import DataLoader

    import shmarray

    if ctx.quick:
        batch, batches, workers, side, reps = 16, 4, 2, 32, 3
    else:
        batch, batches, workers, side, reps = 256, 16, 2, 224, 9
    prefetch = 2
    shape = (3, side, side)
    n = batch * batches
    ds = SyntheticImages(n, shape)
    expect = n * (n - 1) // 2
    per_batch = batch * int(np.prod(shape))
    size = f"{per_batch / 2**20:.1f} MiB" if per_batch >= 1 << 20 else f"{per_batch / 1024:.0f} KiB"
    config = (f"batch {batch} x {'x'.join(map(str, shape))} uint8 ({size}) + int64 labels, "
              f"{batches} batches per epoch, {workers} spawned persistent workers, prefetch_factor {prefetch}")
    # One intra-op thread: on a few cores torch's parallel copy mostly waits for
    # its helper threads to wake up.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common: dict[str, Any] = {"num_workers": workers, "prefetch_factor": prefetch, "persistent_workers": True,
                              "multiprocessing_context": "spawn"}
    consume = _consumer(batch, shape)
    plain: Any = DataLoader(ds, batch_size=batch, **common)
    key = ctx.cleanup.name("ring")
    ring = shmarray.ring_loader(ds, batch_size=batch, key=key, **common)
    h = ctx.cleanup.add(f"ring_loader {key}", ring.close)
    one = {"images": torch.from_numpy(np.stack([ds.pool[i % len(ds.pool)] for i in range(batch)])),
           "labels": torch.arange(batch)}
    methods = {
        LOADER: _epoch(plain, consume, expect),
        RING: _epoch(ring, consume, expect),
        f"{LOADER}, kept": _epoch_kept(plain, consume, expect),
        f"{RING}, kept": _epoch_kept(ring, consume, expect),
        FLOOR: _floor(one, consume, batches),
    }
    try:
        ctx.log(f"  {config}: {len(methods)} methods x {reps} epochs")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    finally:
        torch.set_num_threads(threads)
        ctx.cleanup.done(h)  # ring.close(): the ring is shut down and removed
        _stop_workers(ring.loader)
        _stop_workers(plain)
    nbytes = n * int(np.prod(shape))
    where = {LOADER: (LOADER, DROPPED), RING: (RING, DROPPED), f"{LOADER}, kept": (LOADER, KEPT),
             f"{RING}, kept": (RING, KEPT), FLOOR: (FLOOR, DROPPED)}
    for m, (method, variant) in where.items():
        role = "shmarray" if method == RING else "floor" if method == FLOOR else "peer"
        r = Row(method, samples[m], variant=variant, role=role, error=errors.get(m, ""),
                extra={"batches": batches, "batch": batch, "shape": list(shape), "workers": workers,
                       "image_bytes_per_epoch": nbytes})
        if r.stats is not None:
            r.extra["batches_per_s"] = batches / r.stats.median
        res.rows.append(r)
    rates = []
    for variant in (DROPPED, KEPT):
        parts = []
        for method in (RING, LOADER, FLOOR):
            med = res.median(method, variant=variant)
            if med:
                parts.append(f"{method} {batches / med:.1f} batches/s ({nbytes / med / 1e9:.2f} GB/s of images)")
        if parts:
            rates.append(f"{variant}: " + ", ".join(parts))
    res.notes.append(f"{config}. Each sample is the seconds of one epoch; a ratio of times is the inverse "
                     "ratio of batches/s (DataLoader's ratio = ring_loader's batches/s / DataLoader's).")
    res.notes.append("Batches/s (batches per epoch / median): " + "; ".join(rates) + ".")
    r_drop, d_drop = res.median(RING, variant=DROPPED), res.median(LOADER, variant=DROPPED)
    if r_drop and d_drop:
        res.headline("ring: ring_loader batches/s / DataLoader batches/s", d_drop / r_drop, ">= 1.5",
                     d_drop / r_drop >= 1.5,
                     f"{config}: ring_loader {batches / r_drop:.1f} batches/s, DataLoader {batches / d_drop:.1f}")
    else:
        res.headline("ring: ring_loader batches/s / DataLoader batches/s", None, ">= 1.5", None, "not measured")
    r_kept, d_kept = res.median(RING, variant=KEPT), res.median(LOADER, variant=KEPT)
    aim = "ring, every batch kept: ring_loader batches/s / DataLoader batches/s"
    if r_kept and d_kept:
        cost = f"; ring_loader's batches/s, kept / dropped: {r_drop / r_kept:.2f}x" if r_drop else ""
        res.headline(aim, d_kept / r_kept, "-", None,
                     f"ring_loader {batches / r_kept:.1f} batches/s, DataLoader {batches / d_kept:.1f}{cost}")
    else:
        res.headline(aim, None, "-", None, "not measured")
    return res
