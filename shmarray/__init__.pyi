# The public surface of shmarray, written once. Type checkers and IDEs read
# this file; shmarray/__init__.py parses it at import to build __all__ and to
# load each name from its module on first use. To add a public name, add one
# line here (and set its __module__ to "shmarray" where it is defined).
#
# Names from the modules in _EAGER (shmarray/__init__.py) load at import; the
# rest (Arrow, the ring, torch, the listing and inspection, the doctor) on first use.

from ._admin import collect_garbage as collect_garbage
from ._admin import unlink as unlink
from ._array import SharedArray as SharedArray
from ._array import attach as attach
from ._array import create as create
from ._array import share as share
from ._arrow import TableHandle as TableHandle
from ._arrow import attach_frame as attach_frame
from ._arrow import attach_table as attach_table
from ._arrow import share_frame as share_frame
from ._arrow import share_table as share_table
from ._arrow import table_handle as table_handle
from ._cuda import CudaUnavailableError as CudaUnavailableError
from ._cuda import PinError as PinError
from ._doctor import Doctor as Doctor
from ._doctor import doctor as doctor
from ._errors import AccessMode as AccessMode
from ._errors import AlreadyExistsError as AlreadyExistsError
from ._errors import HeaderError as HeaderError
from ._errors import InvalidKeyError as InvalidKeyError
from ._errors import InvalidSizeError as InvalidSizeError
from ._errors import LockError as LockError
from ._errors import NotFoundError as NotFoundError
from ._errors import OutOfResourcesError as OutOfResourcesError
from ._errors import PermissionDeniedError as PermissionDeniedError
from ._errors import SharedMemoryError as SharedMemoryError
from ._errors import ShmError as ShmError
from ._errors import UnknownShmError as UnknownShmError
from ._inspect import Listing as Listing
from ._inspect import SegmentEntry as SegmentEntry
from ._inspect import SegmentInfo as SegmentInfo
from ._inspect import list_segments as list_segments
from ._inspect import ls as ls
from ._inspect import segment_info as segment_info
from ._ring.ring import BatchRing as BatchRing
from ._ring.slots import LostSlot as LostSlot
from ._ring.slots import RingIterator as RingIterator
from ._ring.slots import RingShutDownError as RingShutDownError
from ._ring.slots import RingStats as RingStats
from ._ring.slots import RingTimeoutError as RingTimeoutError
from ._ring.slots import Slot as Slot
from ._ring.slots import SlotLostError as SlotLostError
from ._ring.slots import SlotStateError as SlotStateError
from ._ring.slots import SlotToken as SlotToken
from ._reuse.allocator import allocating as allocating
from ._segment import Segment as Segment
from .qt import attach_qt as attach_qt
from .qt import QtArray as QtArray
from ._torch import RingCollate as RingCollate
from ._torch import RingLoader as RingLoader
from ._torch import fill_slot as fill_slot
from ._torch import ring_loader as ring_loader

__version__: str
