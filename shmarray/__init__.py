"""shmarray: share NumPy arrays and Arrow tables between processes, zero-copy.

The core is :class:`Segment`, Qt's ``QSharedMemory`` model on POSIX shared
memory: a named segment with create/attach/detach, a segment lock that
survives its holder's death, and Qt's error codes.
"""

from __future__ import annotations

from ._admin import SegmentInfo, collect_garbage, list_segments, segment_info
from ._admin import unlink_key as _unlink_key
from ._array import SharedArray, attach, create, share
from ._arrow import attach_frame, attach_table, share_frame, share_table
from ._cuda import CudaUnavailableError, PinError
from ._listing import Listing, SegmentEntry, ls
from ._errors import (
    AccessMode,
    AlreadyExistsError,
    HeaderError,
    InvalidKeyError,
    InvalidSizeError,
    LockError,
    NotFoundError,
    OutOfResourcesError,
    PermissionDeniedError,
    SharedMemoryError,
    ShmError,
    UnknownShmError,
)
from ._ring import (
    BatchRing,
    LostSlot,
    RingIterator,
    RingShutDownError,
    RingStats,
    RingTimeoutError,
    Slot,
    SlotLostError,
    SlotStateError,
    SlotToken,
)
from ._segment import Segment
from ._torch import RingCollate, RingLoader, fill_slot, ring_loader

__version__ = "0.1.0"

__all__ = [
    "AccessMode",
    "AlreadyExistsError",
    "BatchRing",
    "CudaUnavailableError",
    "LostSlot",
    "PinError",
    "RingCollate",
    "RingIterator",
    "RingLoader",
    "RingShutDownError",
    "RingStats",
    "RingTimeoutError",
    "Slot",
    "SlotLostError",
    "SlotStateError",
    "SlotToken",
    "fill_slot",
    "ring_loader",
    "HeaderError",
    "InvalidKeyError",
    "InvalidSizeError",
    "LockError",
    "NotFoundError",
    "OutOfResourcesError",
    "PermissionDeniedError",
    "Segment",
    "SegmentInfo",
    "SharedArray",
    "SharedMemoryError",
    "ShmError",
    "UnknownShmError",
    "attach",
    "attach_frame",
    "attach_table",
    "collect_garbage",
    "create",
    "list_segments",
    "ls",
    "Listing",
    "SegmentEntry",
    "segment_info",
    "share",
    "share_frame",
    "share_table",
    "unlink",
]


def unlink(key: str) -> None:
    """Remove the segment *key* now (persistent or not); attached users keep their memory.

    Raises NotFoundError when there is no such segment.
    """
    _unlink_key(key)
