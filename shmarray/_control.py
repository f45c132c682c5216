"""The control block: the first page of every shmarray segment, its byte spec and its codec.

Byte layout of a shmarray segment (one object in /dev/shm)::

    [0, PAGE_SIZE)            control block (below)
    [PAGE_SIZE, +size)        the user's bytes: Segment.data

Control block, little-endian::

    offset  size  field
    0       8     magic b"SHMARRAY"
    8       4     version (2; version 1 had no incarnation, its key at 64)
    12      4     flags: bit 0 persistent
    16      8     size: usable bytes, what every attacher's .size reports
    24      8     data offset (the page size of the creating machine)
    32      8     lock mark: pid of the exclusive lock holder, 0 when free
    40      4     dead: 1 once a destroyer has removed the segment
    44      4     creator pid
    48      8     creation time (float64, UNIX seconds)
    56      4     key length in bytes (UTF-8; 0 when created by native key)
    60      4     reserved (0)
    64      8     incarnation: a random nonzero number drawn at creation, so that a
                  reference names this segment and not whatever holds its key later
    72      ...   the key (cut to fit the page; for listings only)

The lock layer reads and writes word MARK_WORD (the lock mark) through a
``'Q'`` view of the mapped block; the attachment layer the dead flag.
"""

from __future__ import annotations

import struct
import time

from ._errors import UnknownShmError
from ._os import backend

__all__ = ["MAGIC", "CONTROL", "PAGE_SIZE", "HEAD_BYTES", "MARK_WORD", "ControlBlock", "parse_control",
           "control_bytes", "new_incarnation"]

MAGIC = b"SHMARRAY"
VERSION = 2
# Segments an earlier shmarray made (no incarnation) are still read.
_READABLE = (1, 2)
FLAG_PERSISTENT = 1
CONTROL = struct.Struct("<8sIIQQQIIdII")  # fields up to the incarnation; 64 bytes
U64 = struct.Struct("<Q")
INCARNATION_OFFSET = 64
DEAD_OFFSET = 40
KEY_OFFSET = 72
KEY_OFFSET_V1 = 64
MARK_OFFSET = 32
MARK_WORD = MARK_OFFSET // 8  # the lock mark as an index into a 'Q' view
PAGE_SIZE = backend.PAGE_SIZE
# How much of the user area attach() reads with the control block: a payload
# header and a typical descriptor (an .npy header is 128 bytes), no more.
HEAD_BYTES = 448


class ControlBlock:
    """The parsed control block of a shmarray segment."""

    __slots__ = ("version", "flags", "size", "data_offset", "mark", "dead", "creator", "created", "key",
                 "incarnation")

    def __init__(self, raw: bytes) -> None:
        (magic, self.version, self.flags, self.size, self.data_offset, self.mark, self.dead,
         self.creator, self.created, keylen, _) = CONTROL.unpack_from(raw, 0)
        key_at = KEY_OFFSET_V1
        # 0: not known (a version-1 segment, or the control block was read short).
        self.incarnation = 0
        if self.version >= 2:
            key_at = KEY_OFFSET
            if len(raw) >= KEY_OFFSET:
                self.incarnation = U64.unpack_from(raw, INCARNATION_OFFSET)[0]
        keylen = min(keylen, max(0, len(raw) - key_at))
        self.key: str | None = (
            raw[key_at : key_at + keylen].decode("utf-8", "replace") if keylen else None
        )

    @property
    def persistent(self) -> bool:
        """True when the segment outlives its last detach."""
        return bool(self.flags & FLAG_PERSISTENT)


def parse_control(raw: bytes, object_size: int) -> ControlBlock | None:
    """The control block in *raw*, None if *raw* does not start with one.

    Raises UnknownShmError when the magic is there but the fields are not
    consistent with an object of *object_size* bytes.
    """
    if len(raw) < CONTROL.size or raw[:8] != MAGIC:
        return None
    cb = ControlBlock(raw)
    if cb.version not in _READABLE:
        raise UnknownShmError(
            f"segment control block has version {cb.version}; this shmarray reads versions "
            f"{', '.join(map(str, _READABLE))}: it was made by a newer shmarray, so attach it with that one"
        )
    if cb.data_offset < CONTROL.size or cb.data_offset % 64 or cb.data_offset + cb.size > object_size:
        raise UnknownShmError(
            f"segment control block is corrupt: data at {cb.data_offset} + {cb.size} bytes "
            f"does not fit the {object_size}-byte object"
        )
    return cb


def control_bytes(size: int, persistent: bool, key: str | None, incarnation: int) -> bytes:
    raw_key = b"" if key is None else key.encode("utf-8", "surrogatepass")[: PAGE_SIZE - KEY_OFFSET]
    head = CONTROL.pack(
        MAGIC, VERSION, FLAG_PERSISTENT if persistent else 0, size, PAGE_SIZE, 0, 0,
        backend.getpid() & 0xFFFFFFFF, time.time(), len(raw_key), 0,
    )
    return head + U64.pack(incarnation) + raw_key


def new_incarnation() -> int:
    """A random nonzero 64-bit number for a new segment's control block."""
    return int(backend.token_hex(8), 16) or 1
