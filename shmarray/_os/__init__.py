"""The OS layer: the only package that calls mmap, fcntl or os on segments.

It picks this platform's backend. Only Linux (where POSIX shared memory is
/dev/shm) is supported today; the upper layers use only the names below.
"""

from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover
    raise ImportError(
        f"shmarray needs Linux (POSIX shared memory in /dev/shm with OFD locks); "
        f"this is {sys.platform!r}"
    )

from . import _linux as backend  # noqa: E402
from ._names import (  # noqa: E402
    MAX_KEY_LENGTH,
    PREFIX,
    TEMP_PREFIX,
    check_key,
    check_native_key,
    native_key_for,
)

__all__ = [
    "backend",
    "MAX_KEY_LENGTH",
    "PREFIX",
    "TEMP_PREFIX",
    "check_key",
    "check_native_key",
    "native_key_for",
]
