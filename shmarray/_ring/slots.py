"""The objects a batch ring hands out: slots, tokens, statistics, iterators, and its errors.

The ring itself (``ring.BatchRing``) owns every state change; a
:class:`Slot` only forwards ``publish``/``handoff``/``abort``/``release`` to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol

import numpy as np

from .._errors import SharedMemoryError, ShmError
from .._reference import Reference
from .layout import READY, SENT



class _Owner(Protocol):
    """What a slot asks of the ring that handed it out (``ring.BatchRing``); declared here so no cycle exists."""

    @property
    def key(self) -> str: ...
    def _slot_views(self, index: int) -> dict[str, np.ndarray[Any, Any]]: ...
    def _publish(self, slot: Slot, rows: int | None, state: int) -> None: ...
    def _finish(self, slot: Slot, *, producer: bool) -> None: ...
    def get(self, timeout: float | None = ...) -> Slot: ...
    def _instance(self) -> Reference | None: ...

__all__ = ["Slot", "SlotToken", "RingStats", "LostSlot", "RingIterator", "RingTimeoutError",
           "RingShutDownError", "SlotLostError", "SlotStateError"]


class RingTimeoutError(ShmError, TimeoutError):
    """No slot (producer) or no batch (consumer) became available within the timeout."""

    code = SharedMemoryError.LockError


class RingShutDownError(ShmError):
    """The ring was shut down, or every consumer has gone while producers wait on a full ring."""


class SlotStateError(ShmError, RuntimeError):
    """A slot used against its state: published twice, released by a non-holder, a closed ring."""


@dataclasses.dataclass(frozen=True)
class LostSlot:
    """A batch lost because its producer died while filling it (in ``SlotLostError.lost``).

    Attributes
    ----------
    ticket : int
        The batch's ticket.
    slot : int
        The slot it was filled in.
    pid : int
        The producer that died.
    epoch : int
        The ring's epoch at the loss.
    """

    ticket: int
    slot: int
    pid: int
    epoch: int


class SlotLostError(ShmError):
    """Producers died while filling slots (``.lost``: the LostSlot records), or a token is stale.

    The slots are already back in the free pool; the next ``get()`` goes on.
    """

    def __init__(self, message: str = "", key: str | None = None, lost: tuple[LostSlot, ...] = ()) -> None:
        super().__init__(message, key)
        self.lost = tuple(lost)

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.message, self.key, self.lost)


@dataclasses.dataclass(frozen=True)
class SlotToken:
    """A handed-off slot, small and picklable: send it any way, ``ring.claim(token)`` it once."""

    key: str
    index: int
    generation: int
    epoch: int
    ticket: int
    #: The ring's segment instance (``_reference``): a token is claimed only from that ring, never from
    #: one that replaced it under the same key. None in a token made by hand.
    ring: Reference | None = None


@dataclasses.dataclass(frozen=True)
class RingStats:
    """A snapshot of a ring (``ring.stats()``): slots by state, and counters since creation.

    Attributes
    ----------
    slots : int
        Slots in the ring.
    free, filling, ready, reading, handed_off : int
        Slots in each state.
    published, delivered, aborted : int
        Batches published, delivered to consumers, and aborted.
    lost : int
        Batches lost because their producer died filling them.
    consumer_lost : int
        Batches dropped because their consumer died reading them.
    shut_down : bool
        ``shutdown()`` was called.
    epoch : int
        The ring's epoch counter.
    """

    slots: int
    free: int
    filling: int
    ready: int
    reading: int
    handed_off: int
    published: int
    delivered: int
    aborted: int
    lost: int
    consumer_lost: int
    shut_down: bool
    epoch: int


class Slot:
    """One slot held by this process: a producer's to fill, or a consumer's to read.

    ``slot["images"]`` is a zero-copy ndarray in the segment (a consumer's
    views cover the first ``rows`` rows when the producer published fewer).
    Views stay valid memory after ``release()`` but the slot may be refilled
    at once: copy what you keep.
    """

    __slots__ = ("_ring", "index", "ticket", "generation", "epoch", "rows", "_producer", "_arrays", "_done")

    def __init__(self, ring: _Owner, index: int, ticket: int, generation: int, epoch: int,
                 producer: bool, rows: int | None) -> None:
        self._ring = ring
        self.index = index
        self.ticket = ticket
        self.generation = generation
        self.epoch = epoch
        self.rows = rows
        self._producer = producer
        self._done = False
        views = ring._slot_views(index)
        if rows is not None:
            views = {k: (v[:rows] if v.ndim else v) for k, v in views.items()}
        self._arrays = views

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def keys(self) -> Any:
        """Field names."""
        return self._arrays.keys()

    def items(self) -> Any:
        """(name, view) pairs."""
        return self._arrays.items()

    @property
    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        """Every field's view, by name."""
        return dict(self._arrays)

    @property
    def held(self) -> bool:
        """True until this slot is published, handed off, aborted or released."""
        return not self._done

    @property
    def role(self) -> str:
        """'producer' or 'consumer'."""
        return "producer" if self._producer else "consumer"

    def publish(self, rows: int | None = None) -> None:
        """Make the filled slot available to ``get()``.

        Parameters
        ----------
        rows : int, optional
            Only the first *rows* rows are valid (a short last batch); None: all.

        Raises
        ------
        SlotStateError
            When this process does not hold the slot for filling.
        RingShutDownError
            After ``shutdown(immediate=True)``.
        TypeError, ValueError
            For *rows* that is not an int within the slot's rows.
        """
        self._ring._publish(self, rows, READY)

    def handoff(self, rows: int | None = None) -> SlotToken:
        """Publish for ``ring.claim(token)`` only (not ``get()``); send the token any way you like.

        Parameters
        ----------
        rows : int, optional
            As :meth:`publish`.

        Returns
        -------
        SlotToken
            Small and picklable; claim it once.
        """
        self._ring._publish(self, rows, SENT)
        return SlotToken(self._ring.key, self.index, self.generation, self.epoch, self.ticket,
                         self._ring._instance())

    def abort(self) -> None:
        """Give the unfilled slot back; its ticket is skipped."""
        self._ring._finish(self, producer=True)

    def release(self) -> None:
        """Give the consumed slot back to the producers."""
        self._ring._finish(self, producer=False)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._done:
            return
        if not self._producer:
            self.release()
        elif exc_type is None:
            self.publish()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "held" if not self._done else "done"
        return f"<shmarray.Slot {self.index} ticket={self.ticket} {self.role} {state} of {self._ring.key!r}>"


class RingIterator:
    """Yields published slots; each is released when the next is asked for. Ends at shutdown."""

    def __init__(self, ring: _Owner, timeout: float | None) -> None:
        self._ring = ring
        self._timeout = timeout
        self._current: Slot | None = None

    def __iter__(self) -> RingIterator:
        return self

    def __next__(self) -> Slot:
        self.close()
        try:
            self._current = self._ring.get(self._timeout)
        except RingShutDownError:
            raise StopIteration from None
        return self._current

    def close(self) -> None:
        """Release the slot handed out last, if still held."""
        cur, self._current = self._current, None
        if cur is not None and cur.held:
            cur.release()


for _cls in (Slot, SlotToken, RingStats, LostSlot, RingIterator, RingTimeoutError, RingShutDownError,
             SlotLostError, SlotStateError):
    _cls.__module__ = "shmarray"
