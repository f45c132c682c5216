"""Qt 6's native IPC keys: ``QNativeIpcKey`` and the key derivations, computed as qtbase does.

The rules are those of qtbase's ``src/corelib/ipc/qtipccommon.cpp`` (Qt 6.6
and later) on Linux:

* ``platformSafeKey(key, type)``: PosixRealtime gives ``"/" + key``; SystemV
  gives *key* itself when it starts with ``/``, else the runtime directory
  (``$XDG_RUNTIME_DIR``, or ``<temp>/runtime-<user>``) ``+ "/" + key``;
  Windows gives nothing here.
* ``legacyNativeKey(key, type)`` (what ``QSharedMemory("key")`` and
  ``setKey()`` use, compatible with Qt 4.4 to 6.5):
  ``"qipc_sharedmemory_"`` (``"qipc_systemsem_"`` for the lock's semaphore)
  + the key's ASCII letters + the SHA-1 of its UTF-8 in hex; in the temp
  directory (``$TMPDIR`` or ``/tmp``, symlinks resolved) for SystemV, after a
  ``/`` for PosixRealtime. The key itself is kept as the "legacy key".
* The string form (``toString()``/``fromString()``): ``type:payload`` with
  the payload percent-encoded where a URL path needs it, and the legacy key
  as a ``?legacyKey=`` query.

Only the Linux build's rules are here (not Apple's 30-character names).
"""

from __future__ import annotations

import functools
import os
import pwd
from typing import Any
from urllib.parse import unquote

from .._errors import QtEnum, qt_value
from .._os._names import QT_SHARED_MEMORY, qt_legacy_name

__all__ = ["QNativeIpcKey", "platform_safe_key", "legacy_native_key", "legacy_key_of", "as_key",
           "SHARED_MEMORY", "SYSTEM_SEMAPHORE", "temp_location", "runtime_location"]

SHARED_MEMORY = QT_SHARED_MEMORY
SYSTEM_SEMAPHORE = "qipc_systemsem_"


class _Type(QtEnum):
    """``QNativeIpcKey.Type``: the IPC API a key names (Qt's values)."""

    SystemV = 0x51  # 'Q': System V, with ftok's project id 'Q'
    PosixRealtime = 0x100
    Windows = 0x101

    @classmethod
    def _missing_(cls, value: object) -> Any:
        # Qt keeps 1..0xff for System V keys with another ftok project id, and 0 for "invalid".
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFF:
            member = int.__new__(cls, value)
            member._name_ = "Invalid" if value == 0 else f"SystemV_{value}"
            member._value_ = value
            return cls._value2member_map_.setdefault(value, member)
        return None


_Type.__name__ = "Type"
_Type.__qualname__ = "QNativeIpcKey.Type"
_Type.__module__ = "shmarray.qt"  # the public path, for reprs and pickles
_INVALID = _Type(0)
# Percent-decoding once, as UTF-8, a malformed escape left as written: what QUrl's path() and Qt's
# fromPercentEncoding of a query item give.
_unquote = functools.partial(unquote, encoding="utf-8", errors="replace")
_TYPE_NAMES = {_Type.SystemV: "systemv", _Type.PosixRealtime: "posix", _Type.Windows: "windows"}


def _as_type(value: object, what: str) -> _Type:
    value = qt_value(value, _Type)
    if isinstance(value, _Type):
        return value
    raise TypeError(f"{what}: the type must be a QNativeIpcKey.Type, not {type(value).__name__} ({value!r})")


def _as_str(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"{what}: the key must be a str, not {type(value).__name__} ({value!r})")


class QNativeIpcKey:
    """A native IPC key and its type, as Qt 6's ``QNativeIpcKey``.

    ``QNativeIpcKey()``, ``QNativeIpcKey(type)``, ``QNativeIpcKey(key,
    type=DefaultTypeForOs)`` or ``QNativeIpcKey(other)`` (ours, or a
    PySide6/PyQt6 one). Equal keys have the same native key, type and
    legacy key. Keys pickle, so a key can be handed to a worker process.

    Parameters
    ----------
    key : str, optional
        The native key (for PosixRealtime, the name in /dev/shm).
    type : QNativeIpcKey.Type, optional
        ``SystemV``, ``PosixRealtime`` or ``Windows``, with Qt's values
        (default ``DefaultTypeForOs``: PosixRealtime on Linux).
    other : QNativeIpcKey
        A key to copy (ours, PySide6's or PyQt6's).

    Examples
    --------
    >>> from shmarray.qt import QNativeIpcKey, QSharedMemory
    >>> k = QNativeIpcKey("camera")
    >>> k.nativeKey(), k.type() == QNativeIpcKey.Type.PosixRealtime
    ('camera', True)
    >>> QNativeIpcKey.fromString(k.toString()) == k
    True
    """

    Type = _Type
    DefaultTypeForOs = _Type.PosixRealtime

    __slots__ = ("_key", "_type", "_legacy")

    def __init__(self, *args: object) -> None:
        self._key = ""
        self._type: _Type = QNativeIpcKey.DefaultTypeForOs
        self._legacy = ""
        if len(args) > 2:
            raise TypeError(f"QNativeIpcKey() takes at most 2 arguments ({len(args)} given)")
        if not args:
            return
        first = args[0]
        if len(args) == 1:
            other = as_key(first)
            if other is not None:
                self._key, self._type, self._legacy = other._key, other._type, other._legacy
                return
            if not isinstance(first, str):
                kind = qt_value(first, _Type)
                if not isinstance(kind, _Type):
                    raise TypeError(f"QNativeIpcKey(): expected a str key, a QNativeIpcKey.Type or a "
                                    f"QNativeIpcKey, not {type(first).__name__} ({first!r})")
                self._type = kind
                return
        self._key = _as_str(first, "QNativeIpcKey")
        if len(args) == 2:
            self._type = _as_type(args[1], "QNativeIpcKey")

    @staticmethod
    def legacyDefaultTypeForOs() -> _Type:
        """The type QSharedMemory used before Qt 6.6 on this OS: SystemV on Linux."""
        return _Type.SystemV

    def nativeKey(self) -> str:
        """The native key, as the OS API takes it."""
        return self._key

    def setNativeKey(self, key: str) -> None:
        """Set the native key (the legacy key is cleared, as Qt does)."""
        self._key = _as_str(key, "QNativeIpcKey.setNativeKey")
        self._legacy = ""

    def type(self) -> _Type:
        """The key's type."""
        return self._type

    def setType(self, type: object) -> None:  # noqa: A002 - Qt's parameter name
        """Set the type. As in Qt 6 (setType_internal), a key carrying a legacy key keeps its type."""
        new = _as_type(type, "QNativeIpcKey.setType")
        if not self._legacy:
            self._type = new

    def isEmpty(self) -> bool:
        """True when the native key is empty."""
        return not self._key

    def isValid(self) -> bool:
        """False only for the invalid type (what fromString() gives for a string it cannot parse)."""
        return self._type != 0

    def swap(self, other: QNativeIpcKey) -> None:
        """Exchange contents with *other*."""
        if not isinstance(other, QNativeIpcKey):
            raise TypeError(f"QNativeIpcKey.swap: expected a QNativeIpcKey, not {type(other).__name__}")
        for name in QNativeIpcKey.__slots__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs)
            setattr(other, name, mine)

    def toString(self) -> str:
        """``type:payload`` (e.g. ``posix:/frames``), to hand the key to another process; '' if invalid."""
        prefix = _type_string(self._type)
        if not prefix:
            return ""
        path = self._key.replace("%", "%25")
        if path.startswith("//"):
            path = "/%2F" + path[2:]  # else it would read as an authority
        text = f"{prefix}:{_encode(path, '?#')}"
        if self._legacy:
            text += "?legacyKey=" + _encode(self._legacy.replace("%", "%25"), "&=#")
        return text

    @staticmethod
    def fromString(text: str) -> QNativeIpcKey:
        """Parse toString()'s form; an invalid key (``isValid()`` False) when it cannot be parsed."""
        text = _as_str(text, "QNativeIpcKey.fromString")
        invalid = QNativeIpcKey(_INVALID)
        scheme, sep, rest = text.partition(":")
        kind = _string_type(scheme.lower()) if sep else None
        if kind is None:
            return invalid
        rest = rest.partition("#")[0]
        path, has_query, query = rest.partition("?")
        if path.startswith("//"):
            authority, slash, tail = path[2:].partition("/")
            if authority:
                return invalid
            path = slash + tail
        key = QNativeIpcKey(_unquote(path), kind)
        if has_query:
            for item in query.split("&"):
                name, _, value = item.partition("=")
                if _unquote(name) != "legacyKey":
                    return invalid
                key._legacy = _unquote(value)
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QNativeIpcKey):
            theirs = as_key(other)
            if theirs is None:
                return NotImplemented
            other = theirs
        return (self._type, self._key, self._legacy) == (other._type, other._key, other._legacy)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((self._key, int(self._type)))

    def __copy__(self) -> QNativeIpcKey:
        return QNativeIpcKey(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._key, int(self._type), self._legacy))

    def __repr__(self) -> str:
        legacy = f", legacyKey={self._legacy!r}" if self._legacy else ""
        return f"QNativeIpcKey({self._key!r}, {type(self._type).__qualname__}.{self._type.name}{legacy})"


QNativeIpcKey.__module__ = "shmarray.qt"


def _restore(key: str, type_value: int, legacy: str) -> QNativeIpcKey:
    made = QNativeIpcKey(key, _Type(type_value))
    made._legacy = legacy
    return made


def as_key(value: object) -> QNativeIpcKey | None:
    """*value* as our QNativeIpcKey: ours as is, a PySide6/PyQt6 one converted; None for anything else."""
    if isinstance(value, QNativeIpcKey):
        return value
    if type(value).__name__ == "QNativeIpcKey" and callable(getattr(value, "toString", None)):
        foreign: Any = value
        text = foreign.toString()  # keeps the legacy key, which Qt's bindings do not otherwise expose
        if isinstance(text, str):
            parsed = QNativeIpcKey.fromString(text)
            if parsed.isValid():
                return parsed
        return QNativeIpcKey(str(foreign.nativeKey()), _as_type(foreign.type(), "QNativeIpcKey"))
    return None


def legacy_key_of(key: QNativeIpcKey) -> str:
    """The Qt key a legacy native key was made from ('' when none)."""
    return key._legacy


def _type_string(kind: _Type) -> str:
    if kind in _TYPE_NAMES:
        return _TYPE_NAMES[kind]
    if 1 <= kind <= 0xFF:
        return f"systemv-{int(kind)}"
    return ""


def _string_type(text: str) -> _Type | None:
    for kind, name in _TYPE_NAMES.items():
        if text == name:
            return kind
    if text.startswith("systemv-") and text[8:].isdigit() and text[8:].isascii():
        number = int(text[8:])
        if 1 <= number <= 0xFF:
            return _Type(number)
    return None


def _encode(text: str, also: str) -> str:
    """Percent-encode what QUrl encodes in a path or query: controls, and the characters in *also*."""
    out = []
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F or ch in also:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


# -- where Qt puts things (QStandardPaths on Linux) -------------------------------------------------

def temp_location() -> str:
    """QDir::tempPath(): $TMPDIR or /tmp, cleaned and with symlinks resolved ('' if it does not exist)."""
    temp = os.environ.get("TMPDIR") or "/tmp"
    path = os.path.realpath(os.path.normpath(temp))
    return path if os.path.exists(path) else ""


def _runtime_ok(path: str) -> bool:
    """Qt's checkXdgRuntimeDir: a directory (made 0700 if missing) owned by us, mode 0700 (fixed if not)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.stat(path)
        if not os.path.isdir(path) or st.st_uid != os.geteuid():
            return False
        if st.st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
    except OSError:
        return False
    return True


def runtime_location() -> str:
    """QStandardPaths::RuntimeLocation: $XDG_RUNTIME_DIR, else <temp>/runtime-<user> ('' if unusable)."""
    env = os.environ.get("XDG_RUNTIME_DIR", "")
    if env and _runtime_ok(env):
        return env
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    path = f"{temp_location()}/runtime-{user}"
    return path if _runtime_ok(path) else ""


# -- the derivations -----------------------------------------------------------------------------------

def platform_safe_key(key: str, kind: object = _Type.PosixRealtime) -> QNativeIpcKey:
    """QtIpcCommon::platformSafeKey, for shared memory and semaphores alike on Linux."""
    key = _as_str(key, "QSharedMemory.platformSafeKey")
    kind = _as_type(kind, "QSharedMemory.platformSafeKey")
    made = QNativeIpcKey(kind)
    if not key:
        return made
    if kind == _Type.PosixRealtime:
        made._key = "/" + key
    elif kind.value <= 0xFF:  # System V; Qt's switch sends the invalid type here too
        made._key = key if key.startswith("/") else runtime_location() + "/" + key
    return made  # Windows: only where Windows IPC exists


def legacy_native_key(key: str, kind: object = _Type.SystemV, *, prefix: str = SHARED_MEMORY) -> QNativeIpcKey:
    """QtIpcCommon::legacyPlatformSafeKey: the Qt 4.4-6.5 derivation, remembering *key* as the legacy key."""
    key = _as_str(key, "QSharedMemory.legacyNativeKey")
    kind = _as_type(kind, "QSharedMemory.legacyNativeKey")
    made = QNativeIpcKey(kind)
    if not key:
        return made
    name = qt_legacy_name(key, prefix)
    if kind == _Type.Windows:
        return made
    if kind == _Type.PosixRealtime:
        made._key = "/" + name
    elif kind.value <= 0xFF:
        made._key = temp_location() + "/" + name
    made._legacy = key
    return made
