"""shmarray: share NumPy arrays and Arrow tables between processes, zero-copy.

The core is :class:`Segment`, Qt's ``QSharedMemory`` model on POSIX shared
memory: a named segment with create/attach/detach, a segment lock that
survives its holder's death, and Qt's error codes.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from ._admin import SegmentInfo, collect_garbage, list_segments, segment_info
from ._admin import unlink_key as _unlink_key
from ._array import SharedArray, attach, create, share
from ._cuda import CudaUnavailableError, PinError
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
from ._segment import Segment

# Arrow, the batch ring, torch and the listing are imported on first use:
# a worker that only attaches arrays should not pay for them at import
# (together ~8 ms of the package's ~25 ms here).
_LAZY = {
    "attach_frame": "_arrow", "attach_table": "_arrow", "share_frame": "_arrow", "share_table": "_arrow",
    "TableHandle": "_arrow", "table_handle": "_arrow",
    "doctor": "_doctor", "Doctor": "_doctor",
    "Listing": "_listing", "SegmentEntry": "_listing", "ls": "_listing",
    "BatchRing": "_ring", "LostSlot": "_ring", "RingIterator": "_ring", "RingShutDownError": "_ring",
    "RingStats": "_ring", "RingTimeoutError": "_ring", "Slot": "_ring", "SlotLostError": "_ring",
    "SlotStateError": "_ring", "SlotToken": "_ring",
    "RingCollate": "_torch", "RingLoader": "_torch", "fill_slot": "_torch", "ring_loader": "_torch",
}

if TYPE_CHECKING:  # pragma: no cover - what type checkers and IDEs see
    from ._arrow import TableHandle, attach_frame, attach_table, share_frame, share_table, table_handle
    from ._doctor import Doctor, doctor
    from ._listing import Listing, SegmentEntry, ls
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
    from ._torch import RingCollate, RingLoader, fill_slot, ring_loader


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmarray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AccessMode",
    "AlreadyExistsError",
    "BatchRing",
    "CudaUnavailableError",
    "Doctor",
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
    "TableHandle",
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
    "doctor",
    "list_segments",
    "ls",
    "Listing",
    "SegmentEntry",
    "segment_info",
    "share",
    "share_frame",
    "share_table",
    "table_handle",
    "unlink",
]


def unlink(key: str, *, dir: "str | os.PathLike[str] | None" = None) -> None:
    """Remove the segment *key* now (persistent or not); attached users keep their memory.

    *dir* is the segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
    Raises NotFoundError when there is no such segment.
    """
    _unlink_key(key, dir=dir)
