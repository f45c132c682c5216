"""torch integration: DataLoader workers write batches straight into a BatchRing.

The usual path copies each batch several times: a worker stacks samples
into a fresh shared-memory tensor (first touch of new pages every batch),
the main process maps it from a passed fd, and ``pin_memory=True`` copies
it again into a pinned buffer before it reaches the GPU. Here a worker's
``collate_fn`` (:class:`RingCollate`) stacks the samples into a slot of a
ring that was created once (warm pages), and returns only a small
:class:`SlotToken`; the DataLoader sends the token, keeps its ordering,
worker management and error reporting, and :class:`RingLoader` turns each
token into ``{name: torch.from_numpy(slot view)}`` (no copy). A pinned ring
(``pin=True``, ``cudaHostRegister``) goes to the GPU by DMA from the slot.

The slot of a batch is released when the consumer asks for the next one:
tensors yielded earlier then alias memory a worker may refill. Clone what
you keep beyond a step. torch is imported only when these objects are used.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ._os import backend
from ._ring.ring import BatchRing, RingShutDownError, RingTimeoutError, Slot, SlotToken
from ._segment import Dir

__all__ = ["RingCollate", "RingLoader", "ring_loader", "fill_slot"]

# A waiting worker checks this often that the DataLoader's main process is alive.
_PARENT_CHECK = 0.5
_RINGS: dict[tuple[str, int], BatchRing] = {}

FillFn = Callable[[Slot, Sequence[Any]], "int | None"]


def fill_slot(slot: Slot, samples: Sequence[Any]) -> int:
    """Stack *samples* into *slot*, field by field; returns the number of rows written.

    A sample is a mapping (field name -> value), a tuple/list (values in the
    ring's field order), or, for a one-field ring, the value itself. Values
    are anything NumPy can read (ndarrays, CPU tensors, scalars); they are
    cast 'same_kind' (float into an integer field is an error, not a silent cut).
    """
    names = list(slot.keys())
    n = len(samples)
    for name in names:
        view = slot[name]
        if view.ndim == 0 or view.shape[0] < n:
            raise ValueError(f"field {name!r} holds {view.shape[0] if view.ndim else 0} rows per slot; "
                             f"a batch of {n} samples does not fit")
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for k, sample in enumerate(samples):
        if isinstance(sample, Mapping):
            missing = [name for name in names if name not in sample]
            if missing:
                raise KeyError(f"sample {k} has no field {missing[0]!r} (it has {sorted(map(str, sample))})")
            for name in names:
                columns[name].append(sample[name])
        elif isinstance(sample, (tuple, list)) and len(names) > 1:
            if len(sample) != len(names):
                raise ValueError(f"sample {k} has {len(sample)} values; the ring has fields {names}")
            for name, value in zip(names, sample, strict=True):
                columns[name].append(value)
        elif len(names) == 1:
            columns[names[0]].append(sample)
        else:
            raise TypeError(f"sample {k} is a {type(sample).__name__}; give a dict or a tuple of {names}")
    for name in names:
        if n:
            np.stack([np.asarray(v) for v in columns[name]], axis=0, out=slot[name][:n], casting="same_kind")
    return n


class RingCollate:
    """A DataLoader ``collate_fn`` that writes each batch into a free slot of *ring* and returns its token.

    Runs in the workers. It pickles by the ring's key and attaches there
    (once per process). *fill* (default :func:`fill_slot`) writes the
    samples and returns the rows it wrote. *timeout* bounds the wait for a
    free slot (None: wait, checking that the main process is alive).
    """

    def __init__(self, ring: BatchRing | str, *, fill: FillFn | None = None,
                 timeout: float | None = None, dir: Dir = None) -> None:
        self.key = ring.key if isinstance(ring, BatchRing) else ring
        seg = ring._seg if isinstance(ring, BatchRing) else None
        # The ring's directory (None: the default), so that workers attach it there.
        self.dir: str | None = seg._dir if seg is not None else (None if dir is None else str(dir))
        self.fill = fill
        from ._lock import check_timeout

        self.timeout = check_timeout(timeout)
        self._owner = backend.getpid()
        self._ring = ring if isinstance(ring, BatchRing) else None

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_collate, (self.key, self.fill, self.timeout, self._owner, self.dir)

    def ring(self) -> BatchRing:
        """The ring, attached in this process on first use."""
        if self._ring is not None and not self._ring.closed:
            return self._ring
        pid = backend.getpid()
        ring = _RINGS.get((self.key, pid))
        if ring is None or ring.closed:
            ring = _RINGS[(self.key, pid)] = BatchRing.attach(self.key, dir=self.dir)
        self._ring = ring
        return ring

    def __call__(self, samples: Sequence[Any]) -> SlotToken:
        ring = self.ring()
        slot = self._acquire(ring)
        try:
            rows = (self.fill or fill_slot)(slot, samples)
            return slot.handoff(rows=rows)
        except BaseException:
            if slot.held:
                slot.abort()
            raise

    def _acquire(self, ring: BatchRing) -> Slot:
        if self.timeout is not None or backend.getpid() == self._owner:
            return ring.acquire(self.timeout)
        while True:
            try:
                return ring.acquire(_PARENT_CHECK)
            except RingTimeoutError:
                if backend.getppid() != self._owner:
                    raise RingShutDownError(
                        f"batch ring {self.key!r}: the DataLoader's main process ({self._owner}) has gone; "
                        "this worker stops", self.key) from None


def _rebuild_collate(key: str, fill: FillFn | None, timeout: float | None, owner: int,
                     dir: str | None = None) -> RingCollate:
    c = RingCollate(key, fill=fill, timeout=timeout, dir=dir)
    c._owner = owner
    return c


class RingLoader:
    """Iterate a DataLoader whose ``collate_fn`` is a :class:`RingCollate`: ``{name: tensor}`` per batch.

    Tensors are ``torch.from_numpy`` over the slot (no copy); fields torch
    cannot hold (structured, strings) come as ndarrays. With *device* each
    batch is copied there (``non_blocking``; by DMA when the ring is
    pinned) and the slot is released once that copy has completed. The
    slot of a batch is released when the next batch is asked for; the last
    batch of an iteration stopped early (``break``, ``next(iter(...))``, an
    exception) stays valid until the next iteration starts or ``close()``.
    Stopping early shuts the DataLoader's workers down and takes back the
    slots of batches never consumed.
    """

    def __init__(self, loader: Any, ring: BatchRing, *, device: Any = None, non_blocking: bool = True,
                 pin: bool = False, own_ring: bool = False) -> None:
        collate = getattr(loader, "collate_fn", None)
        if not isinstance(collate, RingCollate) or collate.key != ring.key:
            raise ValueError(f"the DataLoader's collate_fn must be RingCollate(ring) for ring {ring.key!r}")
        workers = int(getattr(loader, "num_workers", 0))
        prefetch = getattr(loader, "prefetch_factor", None) or 2
        # The DataLoader keeps at most prefetch * workers batches in flight (being
        # filled or waiting in its queues); the consumer holds none while it waits.
        need = prefetch * workers if workers else 1
        if ring.slots < need:
            raise ValueError(
                f"batch ring {ring.key!r} has {ring.slots} slots; a DataLoader with {workers} workers and "
                f"prefetch_factor {prefetch} keeps up to {need} batches in flight: give the ring at least "
                f"{need} slots ({need + 2} lets the workers run while you train)")
        self.loader = loader
        self.ring = ring
        self.device = device
        self.non_blocking = non_blocking
        self._own = own_ring
        # The last batch of an iteration that stopped early (break, next(iter(...)), an
        # exception): kept valid until the next iteration starts or close().
        self._kept: tuple[Slot, Any] | None = None
        if pin:
            ring.pin()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        ring = self.ring
        self._drop_kept()
        ring._new_epoch()
        it = iter(self.loader)
        held: Slot | None = None
        done: Any = None  # a CUDA event: the copy out of the held slot has finished
        finished = False
        try:
            while True:
                if held is not None:
                    # Released before waiting for the next batch, so workers can refill it meanwhile.
                    self._let_go(held, done)
                    held = None
                try:
                    token = next(it)
                except StopIteration:
                    break
                if not isinstance(token, SlotToken):
                    raise TypeError(f"the DataLoader returned a {type(token).__name__}, not a SlotToken; "
                                    "is its collate_fn a RingCollate?")
                held = ring.claim(token)
                batch = {name: _tensor(torch, view) for name, view in held.items()}
                if self.device is not None:
                    batch = {k: (v.to(self.device, non_blocking=self.non_blocking)
                                 if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    done = _record(torch, self.device)
                yield batch
            finished = True
        finally:
            if held is not None:
                self._kept = (held, done)
            if not finished:
                # Workers may be waiting for slots that hold batches nobody will
                # claim: a new epoch makes those stale (freed by the waiters'
                # scans) so the workers can finish and exit promptly.
                ring._new_epoch()
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None and not getattr(self.loader, "persistent_workers", False):
                    shutdown()
            ring._new_epoch()

    def _let_go(self, slot: Slot, done: Any) -> None:
        if slot.held:
            if done is not None:
                done.synchronize()
            elif self.ring.is_pinned:
                _sync_cuda()
            slot.release()

    def _drop_kept(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None and not self.ring.closed:
            self._let_go(*kept)

    def close(self) -> None:
        """Shut the ring down and detach it (and remove it, when this loader created it)."""
        ring = self.ring
        if ring.closed:
            return
        self._drop_kept()
        if self._own:
            ring.shutdown()
            ring.unlink()
        ring.close()

    def __enter__(self) -> RingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensor(torch: Any, view: np.ndarray[Any, Any]) -> Any:
    try:
        return torch.from_numpy(view)
    except TypeError:  # a dtype torch has no tensor type for
        return view


def _record(torch: Any, device: Any) -> Any:
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(dev))
    return event


def _sync_cuda() -> None:
    import torch

    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        # The user may have started non_blocking copies out of the pinned slot.
        torch.cuda.current_stream().synchronize()


def ring_loader(dataset: Any, sample_fields: Mapping[str, Any], batch_size: int, *, num_workers: int = 2,
                slots: int | None = None, key: str | None = None, prefetch_factor: int = 2,
                fill: FillFn | None = None, device: Any = None, pin: bool = False,
                timeout: float | None = None, dir: Dir = None, **loader_kwargs: Any) -> RingLoader:
    """A DataLoader over *dataset* feeding a new ring, wrapped in a RingLoader; ``close()`` removes the ring.

    *sample_fields* gives each field of ONE sample, ``{"images": ((3, 224, 224),
    np.uint8), "labels": ((), np.int64)}``; slots hold *batch_size* rows.
    *slots* defaults to ``prefetch_factor * num_workers + 2``. Other keyword
    arguments go to ``torch.utils.data.DataLoader`` (shuffle, sampler,
    drop_last, persistent_workers, multiprocessing_context, ...). *dir* is the
    ring's segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
    """
    from torch.utils.data import DataLoader

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if not isinstance(sample_fields, Mapping) or not sample_fields:
        raise TypeError("sample_fields must be a non-empty dict of name -> (shape, dtype)")
    fields = {}
    for name, spec in sample_fields.items():
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise TypeError(f"field {name!r}: give (shape, dtype), not {spec!r}")
        shape = (spec[0],) if isinstance(spec[0], int) else tuple(spec[0])
        fields[name] = ((batch_size, *shape), spec[1])
    if "collate_fn" in loader_kwargs or "batch_size" in loader_kwargs:
        raise TypeError("ring_loader sets collate_fn and batch_size itself")
    if slots is None:
        slots = prefetch_factor * num_workers + 2 if num_workers else 2
    key = key or f"ringloader-{backend.getpid()}-{secrets.token_hex(6)}"
    ring = BatchRing.create(key, fields, slots, ordered=False, dir=dir)
    try:
        extra: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers else {}
        collate = RingCollate(ring, fill=fill, timeout=timeout)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                            **extra, **loader_kwargs)
        return RingLoader(loader, ring, device=device, pin=pin, own_ring=True)
    except BaseException:
        ring.unlink()
        ring.close()
        raise
