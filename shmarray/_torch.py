"""torch integration: DataLoader workers write batches straight into a BatchRing.

The usual path copies each batch several times: a worker stacks samples
into a fresh shared-memory tensor (first touch of new pages every batch),
the main process maps it from a passed fd, and ``pin_memory=True`` copies
it again into a pinned buffer before it reaches the GPU. Here a worker's
``collate_fn`` (:class:`RingCollate`) stacks the samples into a slot of a
ring that was created once (warm pages), and returns only a small
:class:`SlotToken`; the DataLoader sends the token, keeps its ordering,
worker management and error reporting, and :class:`RingLoader` turns each
token into tensors that are ``torch.from_numpy`` views of the slot (no
copy), in the structure of the samples (:class:`SampleSchema`, as torch's
``default_collate`` builds it). A pinned loader (``pin=True``) registers
its slot mappings with CUDA, so batches go to the GPU by DMA.

Kept batches. The consumer maps each slot on its own (a *window*: the ring's
slots are page-aligned). When the next batch is asked for, the previous
batch's slot goes back to the workers at once if nothing of that batch is
referenced any more (weak references to the arrays under its tensors: every
tensor, view or ``.numpy()`` of it holds one of them); if something is, the
window's bytes are first moved into private memory at the same addresses
(``_os`` ``privatize``) and the slot gets a fresh window. So a batch kept
anywhere (``list(loader)``, a prefetching wrapper, validation outputs) keeps
its data, and only kept batches pay a copy. Windows hold the file as any
mapping of shmarray does (``_reuse.idle_maps``'s MAPPED lock): its pages are never
recycled under them. torch is imported only when these objects are used.
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ._os import backend
from ._ring.ring import BatchRing, RingShutDownError, RingTimeoutError, Slot, SlotToken
from ._samples import SampleSchema, as_leaf, describe
from ._segment import Dir

__all__ = ["RingCollate", "RingLoader", "ring_loader", "fill_slot"]

# A waiting worker checks this often that the DataLoader's main process is alive.
_PARENT_CHECK = 0.5
_RINGS: dict[tuple[str, int], BatchRing] = {}

FillFn = Callable[[Slot, Sequence[Any]], "int | None"]


def fill_slot(slot: Slot, samples: Sequence[Any]) -> int:
    """Stack *samples* into *slot*, field by field.

    Values are anything NumPy can read (ndarrays, CPU tensors, scalars); they
    are cast 'same_kind' (float into an integer field is an error, not a
    silent cut).

    Parameters
    ----------
    slot : Slot
        A slot held for filling.
    samples : sequence
        Each a mapping (field name -> value), a tuple or list (values in the
        ring's field order), or, for a one-field ring, the value itself.

    Returns
    -------
    int
        The number of rows written.

    Raises
    ------
    ValueError, TypeError, KeyError
        For a sample that does not fit the ring's fields (a missing field is
        a KeyError), or more samples than a slot's rows.
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
            view = slot[name]
            values = [as_leaf(v, name) for v in columns[name]]
            for k, arr in enumerate(values):
                if arr.shape != view.shape[1:]:
                    raise ValueError(f"sample {k}: field {name!r} is {describe(arr.dtype, arr.shape)}, the ring's "
                                     f"field is {describe(view.dtype, view.shape[1:])} (are the values in the "
                                     f"order {names}?)")
            np.stack(values, axis=0, out=view[:n], casting="same_kind")
    return n


class RingCollate:
    """A DataLoader ``collate_fn`` that writes each batch into a free slot of *ring* and returns its token.

    Runs in the workers. It pickles by the ring's key and attaches there
    (once per process).

    Parameters
    ----------
    ring : BatchRing or str
        The ring, or its key.
    fill : callable, optional
        ``fill(slot, samples) -> rows`` (default :func:`fill_slot`).
    timeout : float or None, optional
        Bounds the wait for a free slot (None: wait, checking that the main
        process is alive).
    dir : str or os.PathLike, optional
        The ring's segment directory, for a key.
    """

    def __init__(self, ring: BatchRing | str, *, fill: FillFn | None = None,
                 timeout: float | None = None, dir: Dir = None) -> None:
        self.key = ring.key if isinstance(ring, BatchRing) else ring
        seg = ring._seg if isinstance(ring, BatchRing) else None
        # The ring's directory (None: the default), so that workers attach it there.
        self.dir: str | None = seg._dir if seg is not None else (None if dir is None else str(dir))
        self.fill = fill
        from ._wait import check_timeout

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


class _Windows:
    """The consumer's own mapping of each slot (see "Kept batches" in the module docstring).

    Without page-aligned slots (a ring made elsewhere) or where a window
    cannot be mapped (hugetlbfs), batches are copies instead: never the
    slot's memory, so never overwritten.
    """

    def __init__(self, ring: BatchRing, pin: bool) -> None:
        self.ring = ring
        self.pin = pin
        n = ring.slots
        self.maps: list[Any] = [None] * n
        self.views: list[dict[str, np.ndarray[Any, Any]] | None] = [None] * n
        self.pins: list[Any] = [None] * n
        self.hold: _Hold | None = None
        self.moved = 0  # batches moved out (copied) so far
        window = ring._slot_window(0)
        self.usable = window is not None
        if window is not None:
            try:
                fd = backend.reopen(window[0], True)
            except OSError:  # not writable by this user: no windows, copies
                self.usable = False
                return
            try:
                backend.hold_mapped(fd)  # the file is never recycled or truncated under a window
            except BaseException:
                backend.close(fd)
                raise
            self.hold = _Hold(fd)

    def batch(self, slot: Slot) -> dict[str, np.ndarray[Any, Any]]:
        """Fresh arrays over *slot*'s window (copies when there is none); their life tells if the batch is kept."""
        base = self._base(slot.index) if self.usable else None
        rows = slot.rows
        if base is None:
            return {k: v.copy() for k, v in slot.items()}
        return {k: (v[:rows] if rows is not None and v.ndim else v[...]) for k, v in base.items()}

    def _base(self, i: int) -> dict[str, np.ndarray[Any, Any]] | None:
        views = self.views[i]
        if views is not None:
            return views
        window, hold = self.ring._slot_window(i), self.hold
        if window is None or hold is None:
            return None
        try:
            mm = backend.map_window(hold.fd, window[1], window[2], True)
        except OSError:
            self.usable = False  # e.g. hugetlbfs, whose pages cannot back a window of 4 KiB pages
            return None
        weakref.finalize(mm, _Hold.keep, hold)  # the hold (its fd and lock) lives while any window does
        views = {name: np.ndarray(shape, dtype=dtype, buffer=mm, offset=off)
                 for name, (shape, dtype, off) in self._fields().items()}
        if self.pin:
            from ._cuda import pin_mapping

            self.pins[i] = pin_mapping(mm, readonly=False, key=self.ring.key)
        self.maps[i], self.views[i] = mm, views
        return views

    def _fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype[Any], int]]:
        return {f.name: (f.shape, f.dtype, f.offset) for f in self.ring._lay.fields}

    def map_all(self) -> None:
        """Map (and pin) every window now: pin=True's errors come at construction, not mid-epoch."""
        for i in range(self.ring.slots):
            if self._base(i) is None and self.pin:
                self.ring.pin()  # no windows: pin the ring's own mapping, as before windows
                return

    def move_out(self, i: int) -> None:
        """Turn slot *i*'s window into private memory (a batch still uses it); the slot gets a new window."""
        mm, pinned = self.maps[i], self.pins[i]
        if mm is None:
            return
        if pinned is not None:
            pinned.release()  # CUDA must never hold a range whose pages change under it
        self.maps[i] = self.views[i] = self.pins[i] = None
        backend.privatize(mm)
        self.moved += 1

    def move_out_used(self, pending: list[tuple[Slot, Any, list[Any]]]) -> None:
        """Move out the windows of *pending* batches that are still referenced (the loader is going)."""
        for slot, _, refs in pending:
            if any(r() is not None for r in refs):
                self.move_out(slot.index)

    def close(self) -> None:
        """Unpin and drop every window (those a batch still uses stay mapped until it goes)."""
        for i, pinned in enumerate(self.pins):
            if pinned is not None:
                pinned.release()
            self.pins[i] = None
        self.maps = [None] * len(self.maps)
        self.views = [None] * len(self.views)
        self.hold = None


class _Hold:
    """The description that holds the ring's file for its windows; closed when the last window goes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        weakref.finalize(self, backend.close, fd)

    @staticmethod
    def keep(hold: _Hold) -> None:
        """A window's finalizer: it only keeps *hold* alive until then."""


class RingLoader:
    """Iterate a DataLoader whose ``collate_fn`` is a :class:`RingCollate`: batches of tensors over the slots.

    Batches are ``{name: tensor}`` (with :func:`ring_loader`: the samples'
    structure, as ``default_collate`` gives). Tensors are ``torch.from_numpy``
    over the slot (no copy); fields torch cannot hold (structured, strings)
    come as ndarrays. A batch is never overwritten: when the next one is
    asked for, the previous slot goes back to the workers, and a batch still
    referenced anywhere is first moved into private memory (one copy, only
    for kept batches). The last batch of an iteration keeps its slot until
    the next iteration starts or ``close()``. Stopping early shuts the
    DataLoader's workers down and takes back the slots of batches never
    consumed.

    Parameters
    ----------
    loader : torch.utils.data.DataLoader
        Its ``collate_fn`` is a :class:`RingCollate` on *ring*.
    ring : BatchRing
        The ring; at least ``prefetch_factor * num_workers`` slots.
    device : torch.device or str, optional
        Copy each batch there (``non_blocking``; by DMA when pinned) and
        release the slot once that copy has completed.
    non_blocking : bool, optional
        For the copy to *device*.
    pin : bool, optional
        Register the ring's mapping with CUDA (``BatchRing.pin``).
    own_ring : bool, optional
        ``close()`` also shuts the ring down and removes it.

    Raises
    ------
    ValueError
        When the loader's ``collate_fn`` is not a RingCollate on *ring*.
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
        self._schema: SampleSchema | None = collate.fill if isinstance(collate.fill, SampleSchema) else None
        # Batches handed out whose slots are still held, oldest first: the slot, the CUDA
        # event of its copy, weak references to its arrays.
        self._pending: list[tuple[Slot, Any, list[Any]]] = []
        # In `for batch in loader:` the loop variable still holds the last batch when
        # the next is asked for; it dies a step later. So the newest batch keeps its
        # slot one step more before it is taken for kept (and copied), when the ring
        # has a slot to spare for that beyond what the DataLoader keeps in flight.
        self._keep = 1 if ring.slots > need else 0
        self._windows = _Windows(ring, pin)
        self._pinned = pin
        # A loader dropped without close(): batches still referenced leave the ring first.
        weakref.finalize(self, self._windows.move_out_used, self._pending)
        if pin:
            try:
                self._windows.map_all()
            except BaseException:
                self._windows.close()
                raise

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        import torch

        ring = self.ring
        self._settle(self._keep)
        ring._new_epoch()
        it = iter(self.loader)
        finished = False
        try:
            while True:
                # Before waiting for the next batch, so workers can refill the slots meanwhile.
                self._settle(self._keep)
                try:
                    token = next(it)
                except StopIteration:
                    break
                if not isinstance(token, SlotToken):
                    raise TypeError(f"the DataLoader returned a {type(token).__name__}, not a SlotToken; "
                                    "is its collate_fn a RingCollate?")
                held = ring.claim(token)
                views = self._windows.batch(held)
                refs = [weakref.ref(v) for v in views.values()]
                columns = {name: _tensor(torch, view) for name, view in views.items()}
                del views
                done = None  # a CUDA event: the copy out of the held slot has finished
                if self.device is not None:
                    columns = {k: (v.to(self.device, non_blocking=self.non_blocking)
                                   if isinstance(v, torch.Tensor) else v) for k, v in columns.items()}
                    done = _record(torch, self.device)
                self._pending.append((held, done, refs))
                batch = columns if self._schema is None else self._schema.batch(columns)
                del columns
                yield batch
                del batch  # from here on, only the consumer's references keep the batch
            finished = True
        finally:
            if not finished:
                # Workers may be waiting for slots that hold batches nobody will
                # claim: a new epoch makes those stale (freed by the waiters'
                # scans) so the workers can finish and exit promptly.
                ring._new_epoch()
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None and not getattr(self.loader, "persistent_workers", False):
                    shutdown()
            if not ring.closed:
                self._settle(self._keep)
                ring._new_epoch()

    def _settle(self, keep: int) -> None:
        """Give back the slots of batches nobody references; move out those still used, but the newest *keep*."""
        pending = self._pending
        if not pending or self.ring.closed:
            pending.clear()
            return
        for slot, done, _ in pending:
            if slot.held and done is not None:
                done.synchronize()
        if (self._pinned or self.ring.is_pinned) and any(d is None for _, d, _ in pending):
            _sync_cuda()  # the user may have started non_blocking copies out of the pinned slots
        still = []
        for entry in pending:
            slot, _, refs = entry
            if not slot.held:
                continue
            if any(r() is not None for r in refs):
                still.append(entry)
            else:
                slot.release()
        for slot, _, _ in still[: len(still) - keep] if keep else still:
            self._windows.move_out(slot.index)
            slot.release()
        pending[:] = [e for e in still if e[0].held]  # in place: the finalizer holds this list

    def close(self) -> None:
        """Shut the ring down and detach it (and remove it, when this loader created it).

        Batches still referenced keep their data (the last one is moved out of the ring first).
        """
        ring = self.ring
        if ring.closed:
            return
        try:
            self._settle(0)
        finally:
            self._windows.close()
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


def _first_sample(dataset: Any) -> Any:
    """One sample to learn the fields from: ``dataset[0]``, or the first an iterable dataset yields."""
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        for sample in dataset:
            return sample
        raise ValueError("the dataset yielded no sample to infer the fields from; give sample_fields")
    try:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: no sample to infer the fields from; give sample_fields")
    except TypeError:  # no len(): try index 0 anyway
        pass
    return dataset[0]


def ring_loader(dataset: Any, sample_fields: Mapping[str, Any] | None = None, batch_size: int = 1, *,
                num_workers: int = 2, slots: int | None = None, key: str | None = None,
                prefetch_factor: int = 2, fill: FillFn | None = None, device: Any = None, pin: bool = False,
                timeout: float | None = None, dir: Dir = None, **loader_kwargs: Any) -> RingLoader:
    """A DataLoader over *dataset* feeding a new ring, wrapped in a RingLoader; ``close()`` removes the ring.

    Batches look like ``default_collate``'s: samples that are tuples or lists
    give lists of batched tensors, dicts give dicts, namedtuples namedtuples,
    a single array a tensor. A sample that does not fit raises, naming the
    field and both shapes and dtypes. Batches stay valid for as long as you
    keep them. torch is imported here only.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Any map-style dataset.
    sample_fields : mapping of str to (shape, dtype), optional
        ``{"images": ((3, 224, 224), np.uint8), "labels": ((), np.int64)}``
        sets the fields (samples are then dicts of them, tuples of them in
        that order, or the one value); by default they are learned from
        ``dataset[0]``.
    batch_size : int, optional
        Rows per slot.
    num_workers : int, optional
        DataLoader workers (default 2).
    slots : int, optional
        Default ``prefetch_factor * num_workers + 2``.
    key : str, optional
        The ring's key (default a fresh one).
    prefetch_factor : int, optional
        As the DataLoader's.
    fill : callable, optional
        ``fill(slot, samples) -> rows`` (default :func:`fill_slot`).
    device : torch.device or str, optional
        Copy each batch there; the slot is released once the copy completed.
    pin : bool, optional
        Register the consumer's mappings of the slots with CUDA.
    timeout : float or None, optional
        Bounds a worker's wait for a free slot.
    dir : str or os.PathLike, optional
        The ring's segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
    **loader_kwargs
        Passed to ``torch.utils.data.DataLoader`` (``shuffle``, ``sampler``,
        ``drop_last``, ``persistent_workers``, ``multiprocessing_context``,
        ...); ``collate_fn`` is the ring's.

    Returns
    -------
    RingLoader

    Raises
    ------
    ModuleNotFoundError
        Without torch.
    ValueError, TypeError
        For a bad *batch_size* or *sample_fields*, a ``collate_fn`` argument,
        or a dataset with no sample to learn the fields from.
    """
    from torch.utils.data import DataLoader

    if isinstance(sample_fields, int) and not isinstance(sample_fields, bool):
        raise TypeError(f"ring_loader's second argument is sample_fields (a dict, or None to infer them); "
                        f"pass the batch size by keyword: batch_size={sample_fields}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if sample_fields is not None and (not isinstance(sample_fields, Mapping) or not sample_fields):
        raise TypeError("sample_fields must be a non-empty dict of name -> (shape, dtype), or None")
    if "collate_fn" in loader_kwargs:
        raise TypeError("ring_loader sets collate_fn itself")
    first = _first_sample(dataset)
    schema = (SampleSchema.infer(first) if sample_fields is None
              else SampleSchema.explicit(sample_fields, first))
    fields = {name: ((batch_size, *shape), dtype) for name, (shape, dtype) in schema.fields.items()}
    if slots is None:
        slots = prefetch_factor * num_workers + 2 if num_workers else 2
    key = key or f"ringloader-{backend.getpid()}-{secrets.token_hex(6)}"
    # Page-aligned slots: the consumer maps each on its own (see "Kept batches").
    ring = BatchRing.create(key, fields, slots, ordered=False, dir=dir, slot_align=backend.PAGE_SIZE)
    try:
        extra: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers else {}
        collate = RingCollate(ring, fill=fill or schema, timeout=timeout)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                            **extra, **loader_kwargs)
        rl = RingLoader(loader, ring, device=device, pin=pin, own_ring=True)
        rl._schema = schema
        return rl
    except BaseException:
        ring.unlink()
        ring.close()
        raise
