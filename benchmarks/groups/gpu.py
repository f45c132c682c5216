"""gpu: worker-to-GPU bytes/s, a pinned BatchRing against ``DataLoader(pin_memory=True)``. Opt-in: ``--only gpu``.

Part 1, host to device from one /dev/shm segment (pages touched first), into
a preallocated device buffer, synchronised: pageable
(``dst.copy_(torch.from_numpy(segment view))``: the driver stages it through
its own small pinned buffers), staged (the DataLoader ``pin_memory`` path: a
copy into a pinned torch buffer, then ``non_blocking``), registered
(``Segment.pin()`` once, then ``non_blocking`` straight from the mapping),
and the registration itself (``pin()`` after an ``unpin()``).

Part 2, the data-loader pipeline (synthetic 3 x 224 x 224 uint8 images,
spawned persistent workers) with a consumer that copies each batch's images
into a device buffer (``non_blocking``) and synchronises:
``DataLoader(pin_memory=True)`` against ``ring_loader(pin=True)`` and an
unpinned ring. Figures are image bytes per second.

Without CUDA (or with SHMBENCH_GPU_DEVICE=cpu) every path runs on the CPU,
without pinning, only to check the group: its rows say "cpu check" and their
figures mean nothing. Full: 1 GiB, batch 256, 16 batches, 4 workers (the
committed H100 run, results/gpu_pinned_h100.md, used these); --quick: 64 MiB,
batch 16, 4 batches, 2 workers.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from .._harness import Context, GroupResult, Row, have, human_size, interleave

NAME = "gpu"
TITLE = "GPU: host-to-device from shared memory; worker-to-GPU pipelines"

PAGEABLE = "pageable copy from the segment"
STAGED = "staged through a pinned buffer (DataLoader's pin_memory path)"
REGISTERED = "registered: Segment.pin(), then non_blocking copy"
REGISTRATION = "registration: Segment.pin() of the segment"
LOADER = "DataLoader(pin_memory=True)"
RING_PINNED = "ring_loader(pin=True)"
RING = "ring_loader, not pinned"


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(ctx: Context) -> GroupResult:
    """Both parts; on a machine without CUDA, the CPU check."""
    res = GroupResult(NAME, TITLE, throughput=False)
    if not have("torch"):
        res.rows.append(Row(REGISTERED, [], role="shmarray", error="torch is not installed"))
        return res
    import torch

    want = os.environ.get("SHMBENCH_GPU_DEVICE", "cuda")
    dev = torch.device(want if want != "cuda" or torch.cuda.is_available() else "cpu")
    check = "" if dev.type == "cuda" else " (cpu check)"
    if check:
        res.notes.append("No CUDA device: every path ran on the CPU without pinning, to check the group only; "
                         "the figures mean nothing.")
    else:
        res.notes.append(f"Device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}.")
    size = (64 << 20) if ctx.quick else (1 << 30)
    _h2d(ctx, res, size, dev, check)
    batch, batches, workers = (16, 4, 2) if ctx.quick else (256, 16, 4)
    _pipeline(ctx, res, dev, check, batch=batch, batches=batches, workers=workers)
    return res


def _h2d(ctx: Context, res: GroupResult, size: int, dev: Any, check: str) -> None:
    import torch

    import shmarray

    variant = f"host to device, {human_size(size)}{check}"
    key = ctx.cleanup.name("gpu")
    seg = shmarray.Segment(key).create(size)
    h = ctx.cleanup.add(key, lambda: (seg.unlink(), seg.detach()))
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

        reps = ctx.reps(5, 3)
        samples, errors = interleave(ctx, {PAGEABLE: pageable, STAGED: staged}, reps=reps, warmup=1)
        if cuda:
            # Registered copies need the segment pinned, and the registration samples leave it so:
            # interleaved apart from the unpinned paths, as the script did.
            seg.pin()
            more, more_err = interleave(ctx, {REGISTERED: registered, REGISTRATION: registration},
                                        reps=reps, warmup=1)
            seg.unpin()
            samples.update(more)
            errors.update(more_err)
        else:
            errors[REGISTERED] = errors[REGISTRATION] = "no CUDA device: nothing to pin"
            samples[REGISTERED] = samples[REGISTRATION] = []
            # The check's shmarray row: the pageable copy from the segment.
    finally:
        ctx.cleanup.done(h)
    for m in (REGISTERED, REGISTRATION, STAGED, PAGEABLE):
        role = "shmarray" if m in (REGISTERED, REGISTRATION) or (check and m == PAGEABLE) else "peer"
        if check and m in (REGISTERED, REGISTRATION):
            res.skipped.append(f"{m}: no CUDA device")
            continue
        res.rows.append(Row(m, samples[m], variant=variant, role=role, error=errors.get(m, ""),
                            extra={"bytes": size}))
    a, b = res.median(REGISTERED, variant=variant), res.median(STAGED, variant=variant)
    ok = a is not None and b is not None and a > 0
    res.headline("gpu: staged copy time / registered copy time", b / a if ok else None, "> 1",  # type: ignore[operator]
                 (b / a > 1) if ok else None,  # type: ignore[operator]
                 f"{variant}: registered {size / a / 1e9:.1f} GB/s, staged {size / b / 1e9:.1f} GB/s"  # type: ignore[operator]
                 if ok else "not measured (no CUDA device)")


def _pipeline(ctx: Context, res: GroupResult, dev: Any, check: str, *, batch: int, batches: int,
              workers: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    import shmarray

    from .ring import SyntheticImages

    shape = (3, 224, 224)
    cuda = dev.type == "cuda"
    variant = f"pipeline, batch {batch}, {batches} batches, {workers} workers{check}"
    ds = SyntheticImages(batch * batches, shape)
    dst = torch.empty((batch, *shape), dtype=torch.uint8, device=dev)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def epoch(loader: Any) -> Callable[[], float]:
        def one() -> float:
            t0 = time.perf_counter()
            for b in loader:
                images = b["images"]
                dst[: images.shape[0]].copy_(images, non_blocking=True)
                _sync(dev)  # before the batch's host memory is reused
            return time.perf_counter() - t0
        return one

    common: dict[str, Any] = {"num_workers": workers, "persistent_workers": True,
                              "multiprocessing_context": "spawn"}
    fields = {"images": (shape, np.uint8), "labels": ((), np.int64)}
    plain = DataLoader(ds, batch_size=batch, pin_memory=cuda, **common)
    pinned = shmarray.ring_loader(ds, fields, batch, key=ctx.cleanup.name("gpuring"), pin=cuda, **common)
    unpinned = shmarray.ring_loader(ds, fields, batch, key=ctx.cleanup.name("gpuring"), **common)
    try:
        methods = {LOADER: epoch(plain), RING_PINNED: epoch(pinned), RING: epoch(unpinned)}
        reps = ctx.reps(5, 3)
        ctx.log(f"  {variant}: {len(methods)} methods x {reps} epochs")
        samples, errors = interleave(ctx, methods, reps=reps, warmup=1)
    finally:
        pinned.close()
        unpinned.close()
        del plain
        torch.set_num_threads(threads)
    nbytes = batch * batches * int(np.prod(shape))
    for m in methods:
        res.rows.append(Row(m, samples[m], variant=variant, role="peer" if m == LOADER else "shmarray",
                            error=errors.get(m, ""), extra={"image_bytes_per_epoch": nbytes, "batches": batches}))
    res.notes.append("Pipeline rows are seconds per epoch; batches/s = batches / median, GB/s = image bytes / median.")
    a, b = res.median(RING_PINNED, variant=variant), res.median(LOADER, variant=variant)
    ok = a is not None and b is not None and a > 0
    res.headline("gpu: DataLoader(pin_memory=True) epoch / ring_loader(pin=True) epoch", b / a if ok else None,
                 "> 1", (b / a > 1) if ok else None,  # type: ignore[operator]
                 f"{variant}: ring {batches / a:.1f} batches/s, DataLoader {batches / b:.1f}"  # type: ignore[operator]
                 if ok else "not measured")
