"""BatchRing: fixed-shape batch slots in one segment, from worker processes to a consumer, zero-copy.

Producers (any process) ``acquire()`` a free slot, fill its arrays in place
and ``publish()`` it; a consumer ``get()``s published slots (in acquisition
order, or in any order) as zero-copy views and ``release()``s them::

    ring = BatchRing.create("feed", {"images": ((256, 3, 224, 224), np.uint8),
                                     "labels": ((256,), np.int64)}, slots=8)
    # in a worker:                              # in the trainer:
    with BatchRing.attach("feed") as r:         for batch in ring:   # released when the loop moves on
        with r.acquire() as slot:                   train(batch["images"], batch["labels"])
            slot["images"][:] = ...
            slot["labels"][:] = ...             # publishes on a clean exit, aborts on an exception

How it works. Slot states live in the ring's control block (see
``layout``) and change only under the segment lock (a few microseconds
per change). Whoever holds a slot (a producer filling it, a consumer reading
it) also holds an exclusive OFD byte lock on the segment's file at
``SLOT_BASE + slot``; the kernel drops it when the holder dies, so a slot
whose state says "held" while its byte is free belongs to a dead process and
is taken back. A waiter sleeps in the kernel on the ring's doorbell (a
futex on the version word, which every state change bumps; the changer
rings it when someone sleeps) and wakes every 20 ms regardless to scan for
dead holders, so a killed holder's slot comes back within ~25 ms. Where
futexes cannot be used the waiter polls instead, with naps doubling from
50 us to 1 ms (``_wait``: ``poll_until`` is the one waiting loop either way, ``until_changed`` the fallback's nap).

Ordering. ``ordered=True`` delivers batches in ticket order: the ticket is
taken at ``acquire()``, so the oldest ticket always holds a slot and the
ring cannot deadlock under backpressure. A ticket whose slot was aborted or
lost is skipped. ``ordered=False`` delivers whatever is published, oldest
ticket first.

Failures. A producer that dies while filling: its slot returns to the free
pool and every consumer is told once, by ``SlotLostError`` from its next
``get()`` (``on_lost="raise"``, the default) or only through
``stats().lost`` (``on_lost="skip"``). A consumer that dies while reading:
its slot returns to the free pool, the batch is dropped (delivery is at most
once), ``stats().consumer_lost`` counts it; once every consumer has gone
(died or closed), producers waiting on a full ring get ``RingShutDownError``
instead of waiting forever. ``shutdown()`` wakes every waiter in every
process (see its docstring).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from .._errors import AccessMode, HeaderError, ShmError
from .._header import Kind, pack_header, read_header
from .._header import layout as header_layout
from .._os import backend
from .layout import (
    FILLING, FLAG_ORDERED, FREE, G_ABORTED, G_CONSUMER_LOST, G_CONSUMERS_SEEN, G_DELIVERED, G_EPOCH, G_FLAGS,
    CONSUMER_BYTE, SLOT_BASE, G_LOST, G_MAGIC, G_NEXT_DELIVER, G_NEXT_TICKET, G_PUBLISHED, G_SHUTDOWN, G_SLEEPERS, G_SLOTS, G_VERSION, MAGIC_WORD,
    READING, READY, S_EPOCH, S_GEN, S_PID, S_ROWS, S_STATE, S_TICKET, SENT, SHUTDOWN_DRAIN, SHUTDOWN_NOW,
    RingLayout, count, log_loss, losses, make_layout, parse_descriptor, pick, slot_word,
)
from .slots import (
    LostSlot, RingIterator, RingShutDownError, RingStats, RingTimeoutError, Slot, SlotLostError,
    SlotStateError, SlotToken,
)
from .._lock import ByteLocks
from .._wait import Backoff, check_timeout, deadline_of, poll_until, until_changed
from .._segment import Dir, Segment
from .._reference import Reference, rebuild, reduce

__all__ = ["BatchRing", "Slot", "SlotToken", "RingStats", "LostSlot", "RingIterator", "RingTimeoutError",
           "RingShutDownError", "SlotLostError", "SlotStateError"]

# Without a doorbell, waiters poll (naps doubling to 1 ms); with one they
# sleep in the kernel until rung, but wake at least this often to look for
# holders that died (a dead process rings nothing).
_LAST_NAP = 1e-3
_SCAN_EVERY = 0.02
# The segment lock is held for microseconds by ring operations; even timeout=0
# waits this long for it, so "tries once" is not defeated by a neighbour's update.
_LOCK_GRACE = 0.05
_T = TypeVar("_T")


class BatchRing:
    """A ring of fixed-shape batch slots in one segment: producers fill slots in place, consumers read them in place.

    Build with :meth:`create` or :meth:`attach`, never directly. Timeouts
    follow ``Segment.lock``: None waits forever, 0 tries once, > 0 is a
    deadline; running out raises :class:`RingTimeoutError`. A slot whose
    holder died is taken back (checked every 20 ms by waiters).

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> ring = shmarray.BatchRing.create("doc-ring", {"x": ((4,), np.float32)}, slots=2)
    >>> with ring.acquire() as slot:           # a producer, in any process
    ...     slot["x"][:] = 1.5
    >>> batch = ring.get(timeout=1)            # a consumer
    >>> batch["x"].tolist()
    [1.5, 1.5, 1.5, 1.5]
    >>> batch.release()
    >>> ring.close()
    """

    # Defaults at class level, so close() works on a half-built object.
    _seg: Segment | None = None
    _ctl: memoryview | None = None

    def __init__(self, seg: Segment, lay: RingLayout, payload_offset: int, on_lost: str) -> None:
        """Internal: use BatchRing.create() or BatchRing.attach()."""
        self._key = seg.key or ""
        self._lay = lay
        self._base = payload_offset
        self._on_lost = on_lost
        self._tlock = threading.Lock()
        self._held: dict[int, int] = {}
        self._consumer = False
        self._pid = backend.getpid()
        mapping = seg._mapping()
        # The user bytes start this far into the file (the control page): slot alignment is by file offset.
        data_at = np.frombuffer(mapping, np.uint8).ctypes.data
        whole: Any = mapping.obj if isinstance(mapping, memoryview) else mapping
        self._file_base = data_at - np.frombuffer(whole, np.uint8).ctypes.data + payload_offset
        self._shift = lay.slot_shift(self._file_base)
        ctl = memoryview(mapping)[payload_offset : payload_offset + lay.control_bytes].cast("Q")
        self._ctl = ctl
        self._seg = seg
        self._bytes = ByteLocks(lambda: self._live("lock a slot")[0]._lock_fd())
        # Waiting: the version word is the doorbell (see _nap).
        self._bell = backend.doorbell(ctl, G_VERSION * 8)
        self._asleep = False  # counted in G_SLEEPERS until our next _enter
        self._entered_at = 0  # G_VERSION when this object last took the lock
        self._left_at = 0  # and when it let go
        self._cache: list[dict[str, np.ndarray[Any, Any]] | None] = [None] * lay.slots
        if (ctl[G_MAGIC] != MAGIC_WORD or ctl[G_SLOTS] != lay.slots
                or bool(ctl[G_FLAGS] & FLAG_ORDERED) != lay.ordered):
            raise HeaderError(f"batch ring {self._key!r} has a corrupt control block (magic, slot count or "
                              "flags disagree with its descriptor); recreate the ring", self._key)
        for i in range(lay.slots):
            self._state(i)
        self._lost_seen = ctl[G_LOST]

    # -- building ----------------------------------------------------------------------

    @classmethod
    def create(cls, key: str, fields: Mapping[str, Any], slots: int = 4, *, ordered: bool = True,
               persistent: bool = False, permissions: int = 0o600, on_lost: str = "raise",
               dir: Dir = None, slot_align: int = 64) -> BatchRing:
        """A new ring of *slots* slots, each holding one array per field.

        Parameters
        ----------
        key : str
            The ring's segment key.
        fields : mapping of str to (shape, dtype)
            ``{name: (shape, dtype)}``: each slot holds one array per field.
        slots : int, optional
            How many batches can be in flight (default 4).
        ordered : bool, optional
            Deliver in ticket order (the ticket taken at ``acquire()``; the
            default), or whatever is published first.
        persistent : bool, optional
            Keep the segment after its last holder goes, until ``unlink``.
        permissions : int, optional
            The segment file's mode (default 0o600).
        on_lost : {"raise", "skip"}, optional
            How consumers hear of a producer that died filling a slot: a
            :class:`SlotLostError` from the next ``get()``, or only
            ``stats().lost``.
        dir : str or os.PathLike, optional
            The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
        slot_align : int, optional
            Slots start at file offsets that are multiples of it (a page size
            lets a consumer map each slot on its own, as ``RingLoader`` does).

        Returns
        -------
        BatchRing
            The ring, attached.

        Raises
        ------
        AlreadyExistsError
            When *key* exists.
        TypeError, ValueError
            For bad fields, slots or alignment.
        OutOfResourcesError
            When the directory has no room.
        """
        _check_on_lost(on_lost)
        lay = make_layout(fields, slots, ordered, slot_align)
        desc = lay.descriptor()
        seg = Segment(key, dir=dir)
        p_off, total = header_layout(len(desc), lay.payload_bytes, boundary=seg._boundary())
        head = pack_header(Kind.RING, desc, p_off, lay.payload_bytes)
        ctl = [0] * (lay.control_bytes // 8)
        ctl[G_MAGIC], ctl[G_SLOTS], ctl[G_FLAGS] = MAGIC_WORD, lay.slots, FLAG_ORDERED if ordered else 0
        ctl_bytes = np.array(ctl, dtype="<u8").tobytes()

        def fill(write: Callable[[memoryview, int], None]) -> None:
            write(memoryview(head), 0)
            write(memoryview(ctl_bytes), p_off)

        seg._create(total, persistent=persistent, permissions=permissions, fill=fill)
        try:
            return cls(seg, lay, p_off, on_lost)
        except BaseException:
            seg.detach()
            raise

    @classmethod
    def attach(cls, key: str, *, on_lost: str = "raise", dir: Dir = None) -> BatchRing:
        """Attach the ring *key* made by :meth:`create` (in any process).

        Parameters
        ----------
        key : str
            The ring's segment key.
        on_lost : {"raise", "skip"}, optional
            As :meth:`create`, for this process's ``get()``.
        dir : str or os.PathLike, optional
            The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

        Returns
        -------
        BatchRing

        Raises
        ------
        NotFoundError
            When there is no segment *key*.
        HeaderError
            When the segment holds something else or is corrupt.
        """
        _check_on_lost(on_lost)
        return cls._on(Segment(key, dir=dir).attach(), key, on_lost)

    @classmethod
    def _on(cls, seg: Segment, key: str, on_lost: str) -> BatchRing:
        """The ring in the attached *seg* (detached again if it is not one)."""
        try:
            hdr, desc = read_header(memoryview(seg._mapping()), expect=Kind.RING, key=key)
            lay = parse_descriptor(desc, hdr.payload_length, key=key)
            return cls(seg, lay, hdr.payload_offset, on_lost)
        except BaseException:
            seg.detach()
            raise

    def _instance(self) -> Reference | None:
        """The reference to this ring's segment instance (None once closed)."""
        seg = self._seg
        return Reference.to(seg, AccessMode.ReadWrite) if seg is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as a reference to this ring's segment instance (not whatever holds the key later).
        seg = self._seg
        ref = (Reference.to(seg, AccessMode.ReadWrite) if seg is not None  # a closed ring: its key, any instance
               else Reference(self._key, None, int(AccessMode.ReadWrite), 0, 0, None))
        return reduce(_attach_ring, ref, (self._on_lost,))

    # -- what it is ----------------------------------------------------------------------

    @property
    def key(self) -> str:
        """The ring's segment key."""
        return self._key

    @property
    def segment(self) -> Segment:
        """The segment holding the ring."""
        return self._live("segment")[0]

    @property
    def slots(self) -> int:
        """Number of slots."""
        return self._lay.slots

    @property
    def ordered(self) -> bool:
        """True when batches are delivered in ticket (acquisition) order."""
        return self._lay.ordered

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        """{name: (shape, dtype)} of every slot's arrays."""
        return {f.name: (f.shape, f.dtype) for f in self._lay.fields}

    @property
    def slot_nbytes(self) -> int:
        """Bytes between two slots."""
        return self._lay.stride

    @property
    def closed(self) -> bool:
        """True once close() detached this object."""
        return self._ctl is None

    @property
    def is_shut_down(self) -> bool:
        """True once anyone called shutdown()."""
        return bool(self._live("is_shut_down")[1][G_SHUTDOWN])

    # -- producers -------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Slot:
        """A free slot to fill; waits while all are in use (backpressure).

        Use it as a context manager (published on a clean exit, aborted on an
        exception), or call ``slot.publish(rows=None)`` / ``slot.abort()``.

        Parameters
        ----------
        timeout : float or None, optional
            Seconds to wait: None waits forever, 0 tries once.

        Returns
        -------
        Slot
            A slot held for filling: ``slot[field]`` is an ndarray over its memory.

        Raises
        ------
        RingTimeoutError
            When *timeout* runs out.
        RingShutDownError
            After ``shutdown()``, or when every consumer has gone and the ring
            is full.
        """
        return self._wait(self._try_acquire, timeout, "for a free slot")

    def _try_acquire(self, deadline: float | None) -> Slot | None:
        seg, ctl = self._enter(deadline)
        try:
            if ctl[G_SHUTDOWN]:
                raise RingShutDownError(f"batch ring {self._key!r} is shut down; no new batches", self._key)
            i = self._take_free(ctl)
            if i is None and self._reap(ctl):
                i = self._take_free(ctl)
            if i is None:
                if (ctl[G_CONSUMERS_SEEN] and not self._consumer
                        and not self._bytes.held_elsewhere(CONSUMER_BYTE)):
                    raise RingShutDownError(
                        f"batch ring {self._key!r} is full and every consumer has gone (closed or died); "
                        "start a consumer, or shut the ring down", self._key)
                return None
            s = slot_word(i)
            ticket = ctl[G_NEXT_TICKET]
            ctl[G_NEXT_TICKET] = ticket + 1
            gen = ctl[s + S_GEN] + 1
            epoch = ctl[G_EPOCH]
            ctl[s + S_TICKET], ctl[s + S_PID], ctl[s + S_GEN] = ticket, self._pid, gen
            ctl[s + S_EPOCH], ctl[s + S_ROWS] = epoch, 0
            ctl[s + S_STATE] = FILLING
            ctl[G_VERSION] += 1
            self._held[i] = gen
            return Slot(self, i, ticket, gen, epoch, True, None)
        finally:
            self._leave(seg)

    def _take_free(self, ctl: memoryview) -> int | None:
        fd = self._bytes.fd()
        for i in range(self._lay.slots):
            if ctl[slot_word(i) + S_STATE] == FREE:
                # A free slot's byte is free unless its last holder is mid-exit; skip it then.
                if self._bytes.try_take(SLOT_BASE + i, fd):
                    return i
        return None

    def _publish(self, slot: Slot, rows: int | None, state: int) -> None:
        if rows is not None:
            rows = self._check_rows(rows)
        seg, ctl = self._enter(None)
        try:
            s = self._mine(slot, ctl, FILLING, "publish")
            if ctl[G_SHUTDOWN] == SHUTDOWN_NOW:
                self._drop(slot, ctl, s, G_ABORTED)
                raise RingShutDownError(f"batch ring {self._key!r} was shut down at once; the batch in slot "
                                        f"{slot.index} is dropped", self._key)
            ctl[s + S_ROWS] = 0 if rows is None else rows + 1
            ctl[s + S_STATE] = state
            ctl[G_PUBLISHED] += 1
            ctl[G_VERSION] += 1
            self._let_go(slot)
        finally:
            self._leave(seg)

    def _check_rows(self, rows: int) -> int:
        lead = [f.shape[0] for f in self._lay.fields if f.shape]
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)):
            raise TypeError(f"rows must be an int, not {rows!r}")
        if not lead or not 0 <= rows <= min(lead):
            raise ValueError(f"rows={rows} must lie in [0, {min(lead) if lead else 0}] (the smallest leading "
                             f"dimension of ring {self._key!r}'s fields)")
        return int(rows)

    # -- consumers ---------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Slot:
        """The next published batch, as a held slot; ``release()`` it when done.

        Parameters
        ----------
        timeout : float or None, optional
            Seconds to wait: None waits forever, 0 tries once.

        Returns
        -------
        Slot
            A slot held for reading. Its views stay valid memory after
            ``release()``, but a producer may refill the slot at once: copy what
            you keep.

        Raises
        ------
        RingTimeoutError
            When *timeout* runs out.
        RingShutDownError
            Once the ring is shut down and drained.
        SlotLostError
            Once per loss, when a producer died holding a slot and
            ``on_lost="raise"``; the next ``get()`` goes on.
        """
        self._become_consumer()
        return self._wait(self._try_get, timeout, "for a published batch")

    def _try_get(self, deadline: float | None) -> Slot | None:
        seg, ctl = self._enter(deadline)
        try:
            i = pick(ctl, self._lay.slots, self._lay.ordered)
            if i is None:
                self._reap(ctl)
                i = pick(ctl, self._lay.slots, self._lay.ordered)
            lost = self._news(ctl)
            if lost is None:
                return self._deliver(seg, ctl, i)
        finally:
            self._leave(seg)
        raise lost

    def _deliver(self, seg: Segment, ctl: memoryview, i: int | None) -> Slot | None:
        shut = ctl[G_SHUTDOWN]
        if shut == SHUTDOWN_NOW or (shut and i is None and not count(ctl, self._lay.slots, FILLING)):
            raise RingShutDownError(f"batch ring {self._key!r} is shut down and drained", self._key)
        if i is None:
            return None
        if not self._bytes.try_take(SLOT_BASE + i):
            return None  # a free byte is the rule for a published slot; if not, try next round
        s = slot_word(i)
        ticket, gen, rows = ctl[s + S_TICKET], ctl[s + S_GEN], ctl[s + S_ROWS]
        ctl[s + S_PID] = self._pid
        ctl[s + S_STATE] = READING
        if self._lay.ordered:
            ctl[G_NEXT_DELIVER] = ticket + 1
        ctl[G_DELIVERED] += 1
        ctl[G_VERSION] += 1
        self._held[i] = gen
        return Slot(self, i, ticket, gen, ctl[s + S_EPOCH], False, rows - 1 if rows else None)

    def _news(self, ctl: memoryview) -> SlotLostError | None:
        """New producer losses since this object last looked, as the error to raise (or None)."""
        total = ctl[G_LOST]
        if total <= self._lost_seen:
            return None
        first = self._lost_seen
        self._lost_seen = total
        if self._on_lost != "raise":
            return None
        recs = [LostSlot(*rec) for rec in losses(ctl, first, total)]
        what = ", ".join(f"ticket {r.ticket} (slot {r.slot}, pid {r.pid})" for r in recs)
        return SlotLostError(f"batch ring {self._key!r}: {len(recs)} batch(es) lost because their producer "
                             f"died while filling: {what}; the slots are free again, get() goes on",
                             self._key, tuple(recs))

    def claim(self, token: SlotToken) -> Slot:
        """Take a handed-off slot (see ``Slot.handoff``) for reading.

        Parameters
        ----------
        token : SlotToken
            The small, picklable token ``slot.handoff()`` returned.

        Returns
        -------
        Slot
            The slot, held for reading.

        Raises
        ------
        SlotLostError
            When the token is stale (its slot was taken back).
        """
        if not isinstance(token, SlotToken):
            raise TypeError(f"claim() wants a SlotToken, not {type(token).__name__}")
        if token.key != self._key or not 0 <= token.index < self._lay.slots:
            raise ValueError(f"token {token!r} is not for a slot of batch ring {self._key!r}")
        mine = self._instance()
        if token.ring is not None and mine is not None and token.ring.incarnation != mine.incarnation:
            raise SlotLostError(f"batch ring {self._key!r}: the token for slot {token.index} (ticket {token.ticket}) "
                                "was made by another ring under this key (one that was replaced); it is stale",
                                self._key)
        self._become_consumer()
        seg, ctl = self._enter(None)
        try:
            s = slot_word(token.index)
            if ctl[s + S_STATE] != SENT or ctl[s + S_GEN] != token.generation:
                raise SlotLostError(f"batch ring {self._key!r}: the token for slot {token.index} (ticket "
                                    f"{token.ticket}) is stale; the slot was claimed or reclaimed", self._key)
            if not self._bytes.try_take(SLOT_BASE + token.index):
                raise SlotStateError(f"batch ring {self._key!r}: slot {token.index} is held elsewhere",
                                     self._key)
            rows = ctl[s + S_ROWS]
            ctl[s + S_PID] = self._pid
            ctl[s + S_STATE] = READING
            ctl[G_DELIVERED] += 1
            ctl[G_VERSION] += 1
            self._held[token.index] = token.generation
            return Slot(self, token.index, token.ticket, token.generation, token.epoch, False,
                        rows - 1 if rows else None)
        finally:
            self._leave(seg)

    def __iter__(self) -> RingIterator:
        return RingIterator(self, None)

    def batches(self, timeout: float | None = None) -> RingIterator:
        """Iterate published batches; each is released when the next is asked for.

        ``for batch in ring`` is ``ring.batches()``; iteration ends once the ring
        is shut down and drained.

        Parameters
        ----------
        timeout : float or None, optional
            The wait for each batch (None: forever).

        Returns
        -------
        RingIterator
        """
        timeout = check_timeout(timeout)
        return RingIterator(self, timeout)

    def _become_consumer(self) -> None:
        seg, ctl = self._live("get")
        self._check_pid()
        if not self._consumer:
            self._bytes.take_shared(CONSUMER_BYTE)
            ctl[G_CONSUMERS_SEEN] = 1
            self._consumer = True

    # -- both -----------------------------------------------------------------------------------

    def _finish(self, slot: Slot, producer: bool) -> None:
        if slot._producer != producer:
            who = "producers" if producer else "consumers"
            raise SlotStateError(f"{'abort' if producer else 'release'}() is for {who}; "
                                 f"this slot is a {slot.role}'s")
        seg, ctl = self._enter(None)
        try:
            s = self._mine(slot, ctl, FILLING if producer else READING, "abort" if producer else "release")
            self._drop(slot, ctl, s, G_ABORTED if producer else None)
        finally:
            self._leave(seg)

    def _mine(self, slot: Slot, ctl: memoryview, state: int, what: str) -> int:
        s = slot_word(slot.index)
        if (slot._ring is not self or slot._done or self._held.get(slot.index) != slot.generation
                or ctl[s + S_STATE] != state or ctl[s + S_GEN] != slot.generation):
            raise SlotStateError(f"{what}: slot {slot.index} of batch ring {self._key!r} is not held by this "
                                 "process any more (already published, released or aborted)", self._key)
        return s

    def _drop(self, slot: Slot, ctl: memoryview, s: int, counter: int | None) -> None:
        ctl[s + S_STATE] = FREE
        if counter is not None:
            ctl[counter] += 1
        ctl[G_VERSION] += 1
        self._let_go(slot)

    def _let_go(self, slot: Slot) -> None:
        slot._done = True
        del self._held[slot.index]
        self._bytes.drop(SLOT_BASE + slot.index)

    def shutdown(self, immediate: bool = False) -> None:
        """Stop the ring for every process, waking every waiter (like ``queue.Queue.shutdown``).

        After it, ``acquire()`` raises RingShutDownError. Held slots can always
        be released.

        Parameters
        ----------
        immediate : bool, optional
            False (the default): slots being filled may still be published and
            consumers get every published batch, then RingShutDownError
            (iteration stops). True: published batches are dropped and ``get()``
            and ``publish()`` raise at once.
        """
        seg, ctl = self._enter(None)
        try:
            ctl[G_SHUTDOWN] = max(ctl[G_SHUTDOWN], SHUTDOWN_NOW if immediate else SHUTDOWN_DRAIN)
            if immediate:
                for i in range(self._lay.slots):
                    if self._state(i) == READY:
                        ctl[slot_word(i) + S_STATE] = FREE
            ctl[G_VERSION] += 1
        finally:
            self._leave(seg)

    def stats(self) -> RingStats:
        """Slots by state and the ring's counters, read under the lock.

        Returns
        -------
        RingStats
        """
        seg, ctl = self._enter(None)
        try:
            n = self._lay.slots
            return RingStats(slots=n, free=count(ctl, n, FREE), filling=count(ctl, n, FILLING),
                             ready=count(ctl, n, READY), reading=count(ctl, n, READING),
                             handed_off=count(ctl, n, SENT),
                             published=ctl[G_PUBLISHED], delivered=ctl[G_DELIVERED], aborted=ctl[G_ABORTED],
                             lost=ctl[G_LOST], consumer_lost=ctl[G_CONSUMER_LOST],
                             shut_down=bool(ctl[G_SHUTDOWN]), epoch=ctl[G_EPOCH])
        finally:
            self._leave(seg)

    def _new_epoch(self) -> int:
        """Start a new epoch: handed-off slots of earlier epochs are stale and go back to the pool."""
        seg, ctl = self._enter(None)
        try:
            ctl[G_EPOCH] += 1
            self._reap(ctl)
            return int(ctl[G_EPOCH])
        finally:
            self._leave(seg)

    def _reap(self, ctl: memoryview) -> int:
        """Take back slots of dead holders and stale hand-offs (under the lock); returns how many."""
        epoch = ctl[G_EPOCH]
        fd = self._bytes.fd()
        found = 0
        for i in range(self._lay.slots):
            s = slot_word(i)
            st = self._state(i)
            if st in (FILLING, READING) and i not in self._held:
                if self._bytes.held_elsewhere(SLOT_BASE + i, fd):
                    continue
                if st == FILLING:
                    log_loss(ctl, i)
                else:
                    ctl[G_CONSUMER_LOST] += 1
            elif not (st == SENT and ctl[s + S_EPOCH] < epoch):
                continue
            ctl[s + S_STATE] = FREE
            ctl[G_VERSION] += 1
            found += 1
        return found

    def _state(self, i: int) -> int:
        st = self._live("scan")[1][slot_word(i) + S_STATE]
        if st > SENT:
            raise HeaderError(f"batch ring {self._key!r} has a corrupt control block: slot {i} is in state "
                              f"{st}; "
                              "recreate the ring", self._key)
        return int(st)

    # -- machinery --------------------------------------------------------------------------------

    def _live(self, what: str) -> tuple[Segment, memoryview]:
        seg, ctl = self._seg, self._ctl
        if seg is None or ctl is None:
            raise SlotStateError(f"{what}: batch ring {self._key!r} is closed in this process; attach it "
                                 "again",
                                 self._key)
        return seg, ctl

    def _check_pid(self) -> None:
        pid = backend.getpid()
        if pid != self._pid:
            # A forked child: the parent's slots and consumer lock stay the parent's
            # (Segment gave the child its own lock description).
            self._pid = pid
            self._held = {}
            self._consumer = False
            self._asleep = False  # a sleeper count, if any, is the parent's to take back
            self._tlock = threading.Lock()

    def _enter(self, deadline: float | None) -> tuple[Segment, memoryview]:
        seg, ctl = self._live("ring operation")
        self._check_pid()
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0) + _LOCK_GRACE
        if not self._tlock.acquire(timeout=-1 if wait is None else wait):
            raise RingTimeoutError(f"timed out waiting for batch ring {self._key!r}'s lock", self._key)
        try:
            if not seg.lock(wait):
                raise RingTimeoutError(f"timed out waiting for batch ring {self._key!r}'s lock (is someone "
                                       "holding ring.segment's lock?)", self._key)
        except BaseException:
            self._tlock.release()
            raise
        if self._asleep:  # back from a nap: no longer a sleeper to ring for
            ctl[G_SLEEPERS] -= 1
            self._asleep = False
        self._entered_at = ctl[G_VERSION]
        return seg, ctl

    def _leave(self, seg: Segment) -> None:
        ctl = self._ctl
        ring = False
        if ctl is not None:
            self._left_at = ctl[G_VERSION]
            ring = self._left_at != self._entered_at and ctl[G_SLEEPERS] != 0
        seg.unlock()
        self._tlock.release()
        if ring and self._bell is not None:
            self._bell.ring()  # after the unlock: the woken would only queue for the lock

    def _wait(self, attempt: Callable[[float | None], _T | None], timeout: float | None, what: str) -> _T:
        timeout = check_timeout(timeout)
        deadline = deadline_of(timeout)
        found: list[_T] = []

        def once() -> bool:
            result = attempt(deadline)
            if result is not None:
                found.append(result)
            return result is not None

        nap = self._nap if self._bell is not None else self._poll_nap()
        if poll_until(once, timeout, nap):
            return found[0]
        raise RingTimeoutError(f"batch ring {self._key!r}: timed out after {timeout} s waiting {what}", self._key)

    def _nap(self, left: float | None) -> None:
        """Sleep until the ring changes (its doorbell rings) or _SCAN_EVERY passes, at most *left* seconds.

        Counted as a sleeper in G_SLEEPERS first, under the lock, so whoever
        changes the ring next rings the bell; a change that came in between
        the last attempt and now is seen here and not slept through, and one
        that comes after the count makes the futex return at once.
        """
        span = _SCAN_EVERY if left is None else min(left, _SCAN_EVERY)
        try:
            seg, ctl = self._enter(time.monotonic() + span)
        except RingTimeoutError:
            return  # someone holds the lock: the next attempt waits for it
        try:
            seen = ctl[G_VERSION]
            if seen != self._left_at:
                return  # it changed since our attempt: try again now
            ctl[G_SLEEPERS] += 1
            self._asleep = True
        finally:
            self._leave(seg)
        bell = self._bell
        if bell is not None and self._ctl is not None:
            bell.wait(seen, span)

    def _poll_nap(self) -> Callable[[float | None], None]:
        """Without a doorbell: naps doubling to 1 ms, cut short by a change, at most _SCAN_EVERY."""
        backoff = Backoff(_LAST_NAP)

        def version() -> int | None:
            ctl = self._ctl
            return None if ctl is None else int(ctl[G_VERSION])

        def nap(left: float | None) -> None:
            seen = version()
            if seen is not None:
                until_changed(version, seen, _SCAN_EVERY if left is None else min(left, _SCAN_EVERY), backoff)

        return nap

    def _slot_views(self, i: int) -> dict[str, np.ndarray[Any, Any]]:
        views = self._cache[i]
        if views is None:
            mapping = self._live("views")[0]._mapping()
            base = self._base + self._lay.slot_offset(i, self._shift)
            views = {}
            for f in self._lay.fields:
                views[f.name] = np.ndarray(f.shape, dtype=f.dtype, buffer=mapping, offset=base + f.offset)
            self._cache[i] = views
        return views

    def _slot_window(self, i: int) -> tuple[int, int, int] | None:
        """(fd, file offset, bytes) of slot *i* for a mapping of its own; None unless slots are page-aligned."""
        lay = self._lay
        if lay.slot_align % backend.PAGE_SIZE:
            return None
        seg = self._live("map a slot")[0]
        return seg._lock_fd(), self._file_base + lay.slot_offset(i, self._shift), lay.stride

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Abort the slots this object is filling, release those it reads, and detach. Idempotent.

        Views already taken stay valid memory. The ring itself lives on while
        any process is attached (see Segment's lifetime).
        """
        seg = self._seg
        if seg is None:
            return
        try:
            if (self._held or self._asleep) and self._ctl is not None and backend.getpid() == self._pid:
                _, ctl = self._enter(time.monotonic() + 1.0)
                try:
                    for i, gen in list(self._held.items()):
                        s = slot_word(i)
                        if ctl[s + S_GEN] == gen and ctl[s + S_STATE] in (FILLING, READING):
                            if ctl[s + S_STATE] == FILLING:
                                ctl[G_ABORTED] += 1
                            ctl[s + S_STATE] = FREE
                            ctl[G_VERSION] += 1
                    self._held.clear()
                finally:
                    self._leave(seg)
        except ShmError:
            pass  # the lock is wedged: detaching drops our byte locks and the slots are reaped as lost
        finally:
            mine, self._ctl, self._seg = self._ctl, None, None
            self._cache = []
            if mine is not None:
                mine.release()
            seg.detach()

    def unlink(self) -> bool:
        """Remove the ring's name now; attached processes keep it. False if already gone."""
        return self._live("unlink")[0].unlink()

    def pin(self) -> None:
        """Page-lock the ring's memory for CUDA (``Segment.pin``): host-to-device copies at pinned speed."""
        self._live("pin")[0].pin()

    def unpin(self) -> bool:
        """Undo pin(); False when it was not pinned."""
        return self._live("unpin")[0].unpin()

    @property
    def is_pinned(self) -> bool:
        """True while the ring's memory is registered with CUDA."""
        seg = self._seg
        return seg is not None and seg.is_pinned

    def __enter__(self) -> BatchRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ctl is None else f"{self._lay.slots} slots"
        fields = ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" for f in self._lay.fields)
        return f"<shmarray.BatchRing {self._key!r} {state} {{{fields}}}>"


def _check_on_lost(on_lost: str) -> None:
    if on_lost not in ("raise", "skip"):
        raise ValueError(f"on_lost must be 'raise' or 'skip', not {on_lost!r}")


def _attach_ring(fields: tuple[Any, ...], detail: tuple[str]) -> BatchRing:
    """Unpickle a ring's reference (``_reference``)."""
    return rebuild(_attach_ring, _ring_of, fields, detail)  # type: ignore[no-any-return]


def _ring_of(seg: Segment, ref: Reference, detail: tuple[str]) -> BatchRing:
    (on_lost,) = detail
    _check_on_lost(on_lost)
    return BatchRing._on(seg, ref.key or "", on_lost)


BatchRing.__module__ = "shmarray"
