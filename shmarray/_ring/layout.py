"""The byte layout of a batch ring, and its validation.

A ring's segment holds, in its user bytes (``Segment.data``)::

    payload header (shmarray._header, kind RING) + descriptor (JSON, below)
    payload, 64-byte aligned:
      control block     CONTROL_WORDS + LOST_LOG * 4 + slots * SLOT_WORDS little-endian u64 words
      (slack)           rings with slot_align > 64 only: up to slot_align - 64 bytes, so that
                        slot 0 starts at a file offset that is a multiple of slot_align
      slot 0            each field at a 64-byte aligned offset inside the slot
      slot 1            slots are `stride` bytes apart (a multiple of 64, and of slot_align)
      ...

Descriptor (UTF-8 JSON object)::

    {"format": "shmarray.ring/1", "slots": N, "ordered": true,
     "fields": [{"name": "images", "dtype": "|u1", "shape": [256, 3, 224, 224],
                 "offset": 0, "nbytes": 38535168}, ...],
     "slot_bytes": ..., "stride": ..., "control_bytes": ...}

plus ``"slot_align": A`` when slots are aligned to more than 64 bytes (a
page: a consumer can then map each slot on its own, see ``_torch``).

``dtype`` is numpy's ``.npy`` descriptor (``numpy.lib.format.dtype_to_descr``).
Everything positional is derived from (fields, slots): a reader recomputes
the layout and refuses a descriptor whose offsets differ, so a corrupt or
hostile descriptor can never make a view reach outside its slot.

Control block words (u64): see the ``G_*`` (global), ``L_*`` (lost log) and
``S_*`` (per slot) constants. Slot states are ``FREE``, ``FILLING``
(a producer holds it), ``READY`` (published, waiting for ``get()``),
``READING`` (a consumer holds it) and ``SENT`` (published for ``claim()``
with a token that travels another way, e.g. a DataLoader's result queue).

Byte-range locks on the segment's file (``_lock.ByteLocks``): whoever holds a
slot holds byte SLOT_BASE + slot exclusively, each consumer holds
CONSUMER_BYTE shared. They sit far above the attachment layer's bytes (0, 1
and its pid markers at 2**40 + pid, see ``_os``), so listings never mistake
them for attached processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np
from numpy.lib import format as npy_format

from .._errors import HeaderError
from .._header import ALIGN, align
from .._npy import check_dtype, check_shape

__all__ = ["Field", "RingLayout", "make_layout", "parse_descriptor", "describe_descriptor", "FORMAT"]

FORMAT = "shmarray.ring/1"
MAGIC_WORD = int.from_bytes(b"SHMRING\0", "little")
# A slot table scan is O(slots) per wait step; 4096 keeps it in the microseconds.
MAX_SLOTS = 4096
MAX_FIELDS = 256
MAX_NAME = 256

# Global words.
G_MAGIC, G_SLOTS, G_SHUTDOWN, G_VERSION, G_NEXT_TICKET, G_NEXT_DELIVER, G_EPOCH, G_LOST = range(8)
G_CONSUMER_LOST, G_ABORTED, G_PUBLISHED, G_DELIVERED, G_CONSUMERS_SEEN, G_FLAGS = range(8, 14)
# Processes asleep on the ring's doorbell (a futex on G_VERSION's low half):
# whoever changes G_VERSION while it is nonzero rings. Rings made before this
# word existed hold 0 there, so an older writer only makes a waiter wait for
# its next scan (20 ms); a sleeper that died leaves it high, which costs
# writers a futex syscall per change, nothing more.
G_SLEEPERS = 14
CONTROL_WORDS = 16
# The last LOST_LOG producer deaths: (ticket, slot, pid, epoch) each; entry k of
# the log is the (k+1)-th loss overall, at position k % LOST_LOG.
LOST_LOG = 8
L_TICKET, L_SLOT, L_PID, L_EPOCH = range(4)
# Per-slot words.
S_STATE, S_TICKET, S_PID, S_GEN, S_EPOCH, S_ROWS = range(6)
SLOT_WORDS = 8

SLOT_TABLE = CONTROL_WORDS + LOST_LOG * 4  # word index of slot 0's record
LOG_BASE = CONTROL_WORDS

FREE, FILLING, READY, READING, SENT = range(5)
STATE_NAMES = ("free", "filling", "ready", "reading", "handed off")
FLAG_ORDERED = 1
SHUTDOWN_OPEN, SHUTDOWN_DRAIN, SHUTDOWN_NOW = 0, 1, 2

# Lock bytes (see the docstring).
SLOT_BASE = 1 << 42
CONSUMER_BYTE = SLOT_BASE - 1


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of every slot: name, dtype, shape and byte offset in the slot."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Where everything of a ring lives, relative to the start of its payload."""

    slots: int
    ordered: bool
    fields: tuple[Field, ...]
    slot_bytes: int
    stride: int
    control_bytes: int
    slot_align: int = ALIGN

    @property
    def payload_bytes(self) -> int:
        """Control block, slack for the slots' alignment, and every slot."""
        return self.control_bytes + self.slot_align - ALIGN + self.slots * self.stride

    def slot_offset(self, index: int, shift: int = 0) -> int:
        """Offset of slot *index* from the start of the payload (*shift*: see ``slot_shift``)."""
        return self.control_bytes + shift + index * self.stride

    def slot_shift(self, payload_file_offset: int) -> int:
        """Bytes of slack before slot 0 when the payload starts at *payload_file_offset* in the file."""
        return -(payload_file_offset + self.control_bytes) % self.slot_align

    def descriptor(self) -> bytes:
        """The JSON descriptor."""
        return json.dumps({
            "format": FORMAT,
            "slots": self.slots,
            "ordered": self.ordered,
            "fields": [{"name": f.name, "dtype": npy_format.dtype_to_descr(f.dtype), "shape": list(f.shape),
                        "offset": f.offset, "nbytes": f.nbytes} for f in self.fields],
            "slot_bytes": self.slot_bytes,
            "stride": self.stride,
            "control_bytes": self.control_bytes,
            # Only when set: rings made without it keep their descriptor byte for byte.
            **({"slot_align": self.slot_align} if self.slot_align != ALIGN else {}),
        }, separators=(",", ":")).encode()


def control_bytes_for(slots: int) -> int:
    """Bytes of the control block of a ring with *slots* slots."""
    return align((CONTROL_WORDS + LOST_LOG * 4 + slots * SLOT_WORDS) * 8)


def _check_field(name: str, shape: object, dtype: object) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """A field's (shape, dtype) by the rules every array in a segment follows (``_npy``), sub-arrays folded in."""
    what = f"field {name!r}"
    dims = check_shape(shape, what)
    dt = check_dtype(dtype, what)
    if dt.subdtype is not None:  # ('i4', (2, 3)): fold the sub-array into the shape
        dt, extra = dt.subdtype
        dims = check_shape(dims + tuple(extra), what)
    return dims, dt


def make_layout(fields: Mapping[str, Any], slots: int, ordered: bool, slot_align: int = ALIGN) -> RingLayout:
    """The layout of a new ring; refuses bad input with TypeError / ValueError (InvalidSizeError is one).

    *fields* maps each name to ``(shape, dtype)`` (``{"images": ((256, 3, 224, 224), np.uint8)}``).
    *slot_align* (a power of two from 64 to 1 GiB): slots start at file
    offsets that are multiples of it (a page: each slot can be mapped alone).
    """
    if (isinstance(slot_align, bool) or not isinstance(slot_align, int) or not ALIGN <= slot_align <= 1 << 30
            or slot_align & (slot_align - 1)):
        raise ValueError(f"slot_align must be a power of two from {ALIGN} to 2**30, not {slot_align!r}")
    if not isinstance(fields, Mapping) or not fields:
        raise TypeError("fields must be a non-empty dict of name -> (shape, dtype)")
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"{len(fields)} fields; a ring holds at most {MAX_FIELDS}")
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slots must be an int from 1 to {MAX_SLOTS}, not {slots!r}")
    out = []
    offset = 0
    for name, spec in fields.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise TypeError(f"field names must be non-empty str of at most {MAX_NAME} characters, "
                            f"not {name!r}")
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise TypeError(f"field {name!r}: give (shape, dtype), not {spec!r}")
        shape, dt = _check_field(name, spec[0], spec[1])
        nbytes = math.prod(shape) * dt.itemsize  # Python ints: a hostile shape cannot overflow
        out.append(Field(name, dt, shape, offset, nbytes))
        offset = align(offset + nbytes)
    slot_bytes = max(offset, ALIGN)
    stride = -(-slot_bytes // slot_align) * slot_align
    return RingLayout(int(slots), bool(ordered), tuple(out), slot_bytes, stride,
                      control_bytes_for(int(slots)), slot_align)


def parse_descriptor(raw: bytes, payload_length: int, *, key: str | None) -> RingLayout:
    """The layout a ring descriptor states, validated; HeaderError when it is corrupt."""
    label = f"batch ring {key!r}"

    def bad(why: str) -> HeaderError:
        return HeaderError(f"{label} has a corrupt descriptor: {why}; recreate the ring", key)

    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"not JSON ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    raw_fields = d.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields or len(raw_fields) > MAX_FIELDS:
        raise bad("no field list")
    spec: dict[str, tuple[Any, Any]] = {}
    for f in raw_fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or f["name"] in spec:
            raise bad("a field has no name, or a duplicate one")
        try:
            dt = npy_format.descr_to_dtype(_tuples(f.get("dtype")))
        except Exception as e:  # numpy raises many kinds for a malformed descr
            raise bad(f"field {f['name']!r} has an invalid dtype ({type(e).__name__})") from None
        spec[f["name"]] = (f.get("shape"), dt)
    try:
        lay = make_layout(spec, d.get("slots"), bool(d.get("ordered")),  # type: ignore[arg-type]
                          d.get("slot_align", ALIGN))
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    if lay.descriptor() != raw:
        # Offsets, sizes and stride are derived: any disagreement is corruption.
        raise bad("offsets, sizes or stride do not match the fields")
    if lay.payload_bytes != payload_length:
        raise bad(f"{lay.slots} slots of {lay.stride} bytes need {lay.payload_bytes} payload bytes, "
                  f"the header says {payload_length}")
    return lay


def describe_descriptor(raw: bytes, payload_length: int) -> str:
    """One line for `shmarray ls`: the slots and their fields (never raises on corrupt bytes)."""
    try:
        lay = parse_descriptor(raw, payload_length, key=None)
    except HeaderError:
        return "batch ring (corrupt descriptor)"
    fields = ", ".join(f"{f.name}: {f.dtype} {f.shape}" for f in lay.fields)
    if len(fields) > 160:
        fields = fields[:157] + "..."
    return f"batch ring, {lay.slots} slots of {fields}"


def _tuples(x: object) -> Any:
    # JSON turned numpy's tuples into lists; descr_to_dtype wants them back.
    if isinstance(x, list):
        return [tuple(_tuples(i) for i in e) if isinstance(e, list) else e for e in x]
    return x


# -- slot table operations (the caller holds the segment lock) ----------------------------------


def slot_word(i: int) -> int:
    """Word index of slot *i*'s record in the control block."""
    return SLOT_TABLE + i * SLOT_WORDS


def count(ctl: memoryview, slots: int, state: int) -> int:
    """How many slots are in *state*."""
    return sum(1 for i in range(slots) if ctl[SLOT_TABLE + i * SLOT_WORDS + S_STATE] == state)


def pick(ctl: memoryview, slots: int, ordered: bool) -> int | None:
    """The slot to deliver next, None when the consumer must wait.

    Ordered: the slot holding ticket G_NEXT_DELIVER once READY; tickets in
    no slot (aborted, lost or handed off) are skipped, all at once. Any
    order: the READY slot with the oldest ticket.
    """
    if not ordered:
        best, best_ticket = None, 0
        for i in range(slots):
            s = SLOT_TABLE + i * SLOT_WORDS
            if ctl[s + S_STATE] == READY and (best is None or ctl[s + S_TICKET] < best_ticket):
                best, best_ticket = i, ctl[s + S_TICKET]
        return best
    t, end = ctl[G_NEXT_DELIVER], ctl[G_NEXT_TICKET]
    if t >= end:
        return None
    best, best_ticket, best_state = None, end, FREE
    for i in range(slots):
        s = SLOT_TABLE + i * SLOT_WORDS
        st = ctl[s + S_STATE]
        if st in (FILLING, READY) and t <= ctl[s + S_TICKET] < best_ticket:
            best, best_ticket, best_state = i, ctl[s + S_TICKET], st
    # Every ticket below the oldest live one is in no slot: skip them.
    ctl[G_NEXT_DELIVER] = best_ticket
    return best if best_state == READY else None


def log_loss(ctl: memoryview, i: int) -> None:
    """Record that slot *i*'s producer died while filling it (counter and log)."""
    s = SLOT_TABLE + i * SLOT_WORDS
    k = ctl[G_LOST]
    e = LOG_BASE + (k % LOST_LOG) * 4
    ctl[e + L_TICKET], ctl[e + L_SLOT], ctl[e + L_PID], ctl[e + L_EPOCH] = (
        ctl[s + S_TICKET], i, ctl[s + S_PID], ctl[s + S_EPOCH])
    ctl[G_LOST] = k + 1


def losses(ctl: memoryview, first: int, total: int) -> list[tuple[int, int, int, int]]:
    """(ticket, slot, pid, epoch) of losses number *first* to *total* - 1 (the last LOST_LOG at most)."""
    out = []
    for k in range(max(first, total - LOST_LOG), total):
        e = LOG_BASE + (k % LOST_LOG) * 4
        out.append((ctl[e + L_TICKET], ctl[e + L_SLOT], ctl[e + L_PID], ctl[e + L_EPOCH]))
    return out
