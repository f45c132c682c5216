"""Key -> native key derivation, and checks done before any system call.

A key is any non-empty str of at most 1024 characters without NUL. Its native
key (the POSIX shared-memory name, a file in /dev/shm on Linux) is::

    shmarray_<readable part>_<hash>

where the readable part keeps up to 32 of the key's ASCII letters, digits,
``-`` and ``.`` (so ``ls /dev/shm`` shows what a segment is) and the hash is
the first 20 hex digits of BLAKE2b over the whole key's UTF-8 bytes (80 bits:
two distinct keys collide with probability ~2**-80). The result is at most 62
characters, far under NAME_MAX, and holds no ``/``.
"""

from __future__ import annotations

import functools
import re

try:  # CPython's own BLAKE2; hashlib would also load OpenSSL's _hashlib (slow: benchmarks/results/notes.md)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - other interpreters
    from hashlib import blake2b

from .._errors import InvalidKeyError

__all__ = ["PREFIX", "MAX_KEY_LENGTH", "check_key", "native_key_for", "check_native_key"]

PREFIX = "shmarray_"
TEMP_PREFIX = ".shmarray-tmp-"
MAX_KEY_LENGTH = 1024
_NAME_MAX = 255
_READABLE = re.compile(r"[^A-Za-z0-9.\-]+")


def check_key(key: object) -> str:
    """Return *key* if it is a usable key, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(
            f"a segment key must be a str, not {type(key).__name__} ({key!r})", None
        )
    if not key:
        raise InvalidKeyError("a segment key must not be empty; pass a name such as 'frames'", key)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"segment key {key[:40]!r}... is {len(key)} characters long; "
            f"the limit is {MAX_KEY_LENGTH}",
            key,
        )
    if "\0" in key:
        raise InvalidKeyError(f"segment key {key!r} contains a NUL character; remove it", key)
    return key


@functools.lru_cache(maxsize=1024)  # a worker attaches the same few keys task after task
def native_key_for(key: str) -> str:
    """The POSIX shm name (without leading '/') that *key* maps to."""
    raw = key.encode("utf-8", "surrogatepass")
    digest = blake2b(raw, digest_size=10).hexdigest()
    readable = _READABLE.sub("", key)[:32]
    return f"{PREFIX}{readable}_{digest}"


QT_SHARED_MEMORY = "qipc_sharedmemory_"


def qt_legacy_name(key: str, prefix: str = QT_SHARED_MEMORY) -> str:
    """Qt's legacy native name of *key* (QtIpcCommon::legacyPlatformSafeKey, Qt 4.4-6.5): prefix, letters, SHA-1."""
    import hashlib  # only here: at import it would load OpenSSL's _hashlib (see above)

    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()
    letters = "".join(ch for ch in key if ("a" <= ch <= "z") or ("A" <= ch <= "Z"))
    return prefix + letters + digest


def qt_posix_names(key: str) -> list[str]:
    """The /dev/shm names a Qt program's QSharedMemory(*key*) may have made: Qt 6's, then the legacy one."""
    names = [key] if "/" not in key and key not in (".", "..") and len(key) <= _NAME_MAX else []
    return [*names, qt_legacy_name(key)]


def check_native_key(name: object) -> str:
    """Normalise a native key (strip one leading '/') or raise InvalidKeyError."""
    if not isinstance(name, str):
        raise InvalidKeyError(
            f"a native key must be a str, not {type(name).__name__} ({name!r})", None
        )
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise InvalidKeyError("a native key must not be empty; pass the OS name of the segment", name)
    if "/" in bare or "\0" in bare or bare in (".", ".."):
        raise InvalidKeyError(
            f"native key {name!r} is not a valid POSIX shared-memory name "
            "(one optional leading '/', no other '/' or NUL)",
            name,
        )
    if len(bare.encode("utf-8", "surrogatepass")) > _NAME_MAX:
        raise InvalidKeyError(
            f"native key {name[:40]!r}... is longer than the OS limit of {_NAME_MAX} bytes", name
        )
    return bare
