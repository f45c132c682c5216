"""The payload header: what a segment holds, and where.

Every typed payload (an ndarray, an Arrow table, a batch ring) starts its
segment's user bytes (``Segment.data``) with this fixed 64-byte block,
followed by a kind-specific descriptor in a standard format, followed by
the payload itself, 64-byte aligned::

    offset  size  field (little-endian)
    0       8     magic b"SHMAHDR\\0"
    8       2     version (1)
    10      2     kind: 1 ndarray, 2 arrow, 3 ring
    12      4     ready: 0 while being written, 1 once complete (written last)
    16      8     descriptor offset, from the start of the user bytes (64)
    24      8     descriptor length (at most MAX_DESCRIPTOR)
    32      8     payload offset, from the start of the user bytes (multiple of 64)
    40      8     payload length
    48      16    reserved (0)
    64      ...   descriptor (ndarray: the .npy header of numpy.lib.format;
                  arrow: a JSON summary; ring: a JSON layout)
    ...           padding to 64
    p       n     payload

The user bytes themselves start on a page boundary, so a payload offset that
is a multiple of 64 is 64-byte aligned in memory.

A reader validates every field against the segment's size before it looks
at the descriptor: a corrupt, truncated or foreign block is a HeaderError
naming what is wrong, never a wrong view.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from ._errors import HeaderError, NotFoundError, WrongKindError
from ._wait import poll_until

__all__ = [
    "Kind",
    "HEADER",
    "ALIGN",
    "MAGIC",
    "MAX_DESCRIPTOR",
    "PayloadHeader",
    "align",
    "layout",
    "pack_header",
    "parse_header",
    "read_header",
    "header_from",
    "kind_of",
]

MAGIC = b"SHMAHDR\0"
VERSION = 1
ALIGN = 64
# Descriptors are parsed (npy header text, JSON); cap what a reader accepts so
# a corrupt length cannot make it read or parse gigabytes.
MAX_DESCRIPTOR = 1 << 20
HEADER = struct.Struct("<8sHHIQQQQ16x")
_READY_OFFSET = 12


class Kind(enum.IntEnum):
    """Payload kinds."""

    NDARRAY = 1
    ARROW = 2
    RING = 3

    @property
    def label(self) -> str:
        """The word users see: 'ndarray', 'arrow table', 'batch ring'."""
        return {1: "ndarray", 2: "arrow table", 3: "batch ring"}[self.value]


class PayloadHeader(NamedTuple):
    """A parsed, validated payload header (a NamedTuple: every attach makes one)."""

    kind: Kind
    ready: bool
    descriptor_offset: int
    descriptor_length: int
    payload_offset: int
    payload_length: int


def align(n: int, to: int = ALIGN) -> int:
    """*n* rounded up to a multiple of *to*."""
    return (n + to - 1) // to * to


def layout(descriptor_length: int, payload_length: int, phase: int | None = None,
           boundary: tuple[int, int] | None = None) -> tuple[int, int]:
    """(payload offset, total user bytes) for a descriptor and payload of these lengths.

    With *boundary* ``(first, step)`` (the user offset of the first huge-page
    boundary of the file, and the huge page size) a payload of at least one
    huge page starts on such a boundary, so huge pages back it from its
    first byte; it wins over *phase*.

    With *phase* (a multiple of ALIGN below 4096) the payload starts at the
    first aligned offset that is *phase* bytes into a 4 KiB page: a copy
    from a source a little behind its destination in page offset runs several
    times slower (``rep movsb`` 4K aliasing; figure in
    benchmarks/results/notes.md), so a writer can place the
    payload where its source's alignment copies at full speed.
    """
    payload_offset = align(HEADER.size + descriptor_length)
    if boundary is not None and payload_length >= boundary[1]:
        first, step = boundary
        payload_offset = first + -(-max(payload_offset - first, 0) // step) * step
    elif phase is not None:
        payload_offset += (phase - payload_offset) % 4096
    return payload_offset, payload_offset + payload_length


def pack_header(kind: Kind, descriptor: bytes, payload_offset: int, payload_length: int,
                *, ready: bool = True) -> bytes:
    """The header block followed by the descriptor, ready to write at user offset 0."""
    if len(descriptor) > MAX_DESCRIPTOR:
        raise HeaderError(f"descriptor of {len(descriptor)} bytes exceeds the {MAX_DESCRIPTOR}-byte cap")
    if payload_offset % ALIGN or payload_offset < HEADER.size + len(descriptor):
        raise HeaderError(f"payload offset {payload_offset} overlaps the descriptor or is unaligned")
    head = HEADER.pack(MAGIC, VERSION, int(kind), 1 if ready else 0, HEADER.size, len(descriptor),
                       payload_offset, payload_length)
    return head + descriptor


def kind_of(head: bytes | memoryview) -> Kind | None:
    """The kind named by a header, None when *head* holds no shmarray payload header."""
    if len(head) < HEADER.size or bytes(head[:8]) != MAGIC:
        return None
    kind = struct.unpack_from("<H", head, 10)[0]
    try:
        return Kind(kind)
    except ValueError:
        return None


def parse_header(head: bytes | memoryview, size: int, *, key: str | None = None) -> PayloadHeader:
    """Validate the header in *head* (the first bytes of a segment of *size* user bytes)."""
    label = f"segment {key!r}" if key is not None else "segment"
    if size < HEADER.size or len(head) < HEADER.size:
        raise HeaderError(f"{label} holds raw bytes ({size} bytes, too small for a payload header)", key)
    magic, version, kind, ready, d_off, d_len, p_off, p_len = HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise HeaderError(f"{label} holds raw bytes (no shmarray payload header)", key)
    if version != VERSION:
        raise HeaderError(f"{label} has payload header version {version}; this shmarray reads {VERSION}", key)
    try:
        k = Kind(kind)
    except ValueError:
        raise HeaderError(f"{label} has an unknown payload kind {kind}", key) from None
    if ready not in (0, 1):
        raise HeaderError(f"{label} has a corrupt ready flag {ready}", key)
    if d_off != HEADER.size:
        raise HeaderError(f"{label}: descriptor offset {d_off} is not {HEADER.size}", key)
    if d_len > MAX_DESCRIPTOR:
        raise HeaderError(f"{label}: descriptor length {d_len} exceeds the {MAX_DESCRIPTOR}-byte cap", key)
    if d_off + d_len > size:
        raise HeaderError(f"{label}: descriptor ({d_len} bytes at {d_off}) overruns the {size}-byte segment", key)
    if p_off % ALIGN or p_off < d_off + d_len:
        raise HeaderError(f"{label}: payload offset {p_off} is unaligned or overlaps the descriptor", key)
    if p_off > size or p_len > size - p_off:
        raise HeaderError(
            f"{label}: payload ({p_len} bytes at {p_off}) overruns the {size}-byte segment", key)
    return PayloadHeader(kind=k, ready=bool(ready), descriptor_offset=d_off, descriptor_length=d_len,
                         payload_offset=p_off, payload_length=p_len)


def read_header(data: memoryview, *, expect: Kind, key: str | None = None,
                wait: float = 2.0) -> tuple[PayloadHeader, bytes]:
    """Parse and check the header of an attached segment's user bytes.

    Raises HeaderError naming what the segment holds when it is not *expect*.
    A payload still being written is waited for up to *wait* seconds, then
    NotFoundError.
    """
    found: list[PayloadHeader] = []

    def published() -> bool:
        hdr = _expect(parse_header(data[: HEADER.size], data.nbytes, key=key), expect, key)
        found[:] = [hdr]
        return hdr.ready

    # The lock layer's polling loop: one timeout rule (0 tries once) for the package.
    if not poll_until(published, wait):
        raise NotFoundError(f"segment {key!r} is still being written by its creator; try again", key)
    hdr = found[0]
    d = bytes(data[hdr.descriptor_offset : hdr.descriptor_offset + hdr.descriptor_length])
    return hdr, d


def header_from(head: bytes, size: int, *, expect: Kind,
                key: str | None = None) -> tuple[PayloadHeader, bytes] | None:
    """read_header() on a copy of the first bytes of the user area (*size* bytes in all).

    For a payload that is published complete (an array): None when *head*
    is too short to hold the descriptor or the payload is not marked ready,
    so the caller reads the mapping instead.
    """
    if len(head) < HEADER.size:
        return None
    hdr = _expect(parse_header(head, size, key=key), expect, key)
    end = hdr.descriptor_offset + hdr.descriptor_length
    if not hdr.ready or end > len(head):
        return None
    return hdr, head[hdr.descriptor_offset : end]


def _expect(hdr: PayloadHeader, expect: Kind, key: str | None) -> PayloadHeader:
    if hdr.kind != expect:
        raise WrongKindError(
            f"segment {key!r} holds {_a(hdr.kind.label)}, not {_a(expect.label)}; {_hint(hdr.kind)}", key)
    return hdr


def _a(label: str) -> str:
    return ("an " if label[0] in "aeioun" else "a ") + label


def _hint(kind: Kind) -> str:
    return {
        Kind.NDARRAY: "use shmarray.attach()",
        Kind.ARROW: "use shmarray.attach_table()",
        Kind.RING: "open it as a batch ring (shmarray.BatchRing.attach())",
    }[kind]
