"""Enums and the exception tree shared by every layer.

Each exception is a :class:`ShmError` (with ``.code``, a :class:`SharedMemoryError`,
and ``.key``) and also the built-in exception a Python user would catch, so
``except FileNotFoundError`` works as well as ``except shmarray.NotFoundError``.
Exceptions pickle (they travel back from worker processes).
"""

from __future__ import annotations

import enum
import functools
from typing import Callable, ParamSpec, TypeVar

__all__ = [
    "QtEnum",
    "qt_value",
    "AccessMode",
    "SharedMemoryError",
    "ShmError",
    "PermissionDeniedError",
    "InvalidSizeError",
    "InvalidKeyError",
    "AlreadyExistsError",
    "NotFoundError",
    "LockError",
    "OutOfResourcesError",
    "UnknownShmError",
    "HeaderError",
    "WrongKindError",
    "error_class",
    "user_facing",
]


# The Qt class each of our Qt enums belongs to: PySide6 names QSystemSemaphore's AccessMode
# "QSystemSemaphore.AccessMode", which must not pass for QSharedMemory's.
_QT_SCOPE = {"AccessMode": "QSharedMemory", "SharedMemoryError": "QSharedMemory", "Type": "QNativeIpcKey"}


def _same_qt_enum(theirs: type, ours: type) -> bool:
    name = ours.__name__
    return theirs.__name__ == name and theirs.__qualname__ in (name, f"{_QT_SCOPE.get(name, '')}.{name}")


class QtEnum(enum.IntEnum):
    """An IntEnum that also equals a Qt binding's enum (PySide6, PyQt6) of the same name and value.

    PySide6's and PyQt6's enums are plain ``enum.Enum``s, equal only to
    themselves; Qt's C++ enums compare by value. So ``AccessMode.ReadOnly ==
    PySide6.QtCore.QSharedMemory.AccessMode.ReadOnly`` holds, both ways round
    (their ``__eq__`` defers to ours). Hashes stay those of the ints.
    """

    def __eq__(self, other: object) -> bool:
        if isinstance(other, enum.Enum) and not isinstance(other, QtEnum):
            return _same_qt_enum(type(other), type(self)) and other.value == self.value
        return int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = enum.IntEnum.__hash__


def qt_value(value: object, enum_type: type[QtEnum]) -> object:
    """A Qt binding's enum member of *enum_type*'s name as that member of ours; anything else as is."""
    if isinstance(value, enum.Enum) and not isinstance(value, QtEnum) \
            and _same_qt_enum(type(value), enum_type) and isinstance(value.value, int):
        try:
            return enum_type(value.value)
        except ValueError:
            return value
    return value


class AccessMode(QtEnum):
    """How a segment is mapped: ``ReadOnly`` (0) or ``ReadWrite`` (1), as in Qt."""

    ReadOnly = 0
    ReadWrite = 1


class SharedMemoryError(QtEnum):
    """Qt's ``QSharedMemory::SharedMemoryError`` codes, with Qt's values."""

    NoError = 0
    PermissionDenied = 1
    InvalidSize = 2
    KeyError = 3
    AlreadyExists = 4
    NotFound = 5
    LockError = 6
    OutOfResources = 7
    UnknownError = 8


class ShmError(Exception):
    """Base of every shmarray error.

    Each subclass is also the built-in exception you would catch
    (``NotFoundError`` is a ``FileNotFoundError``, ``AlreadyExistsError`` a
    ``FileExistsError``, ``InvalidSizeError`` a ``ValueError`` ...), and
    pickles with its message and key.

    Parameters
    ----------
    message : str, optional
        What went wrong, and usually what to do.
    key : str, optional
        The segment's key, when there is one.

    Attributes
    ----------
    code : SharedMemoryError
        Qt's error code for this kind of failure.
    key : str or None
        The segment's key.
    message : str
        The message.

    Examples
    --------
    >>> import shmarray
    >>> try:
    ...     shmarray.attach("doc-never-created")
    ... except FileNotFoundError as e:
    ...     print(type(e).__name__, e.key, e.code.name)
    NotFoundError doc-never-created NotFound
    """

    code: SharedMemoryError = SharedMemoryError.UnknownError

    def __init__(self, message: str = "", key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # OSError subclasses would otherwise pickle through (errno, strerror).
        return self.__class__, (self.message, self.key)


class PermissionDeniedError(ShmError, PermissionError):
    """The caller lacks the permissions the operation needs."""

    code = SharedMemoryError.PermissionDenied


class InvalidSizeError(ShmError, ValueError):
    """A size that is not a positive integer, or does not match the segment."""

    code = SharedMemoryError.InvalidSize


class InvalidKeyError(ShmError, ValueError, TypeError):
    """An empty, over-long or otherwise unusable key (a key that is not a str too: hence also a TypeError)."""

    code = SharedMemoryError.KeyError


class AlreadyExistsError(ShmError, FileExistsError):
    """``create()`` found a live segment with the same name."""

    code = SharedMemoryError.AlreadyExists


class NotFoundError(ShmError, FileNotFoundError):
    """No live segment has that name."""

    code = SharedMemoryError.NotFound


class LockError(ShmError):
    """The segment lock could not be taken (timeout, not attached, foreign segment)."""

    code = SharedMemoryError.LockError


class OutOfResourcesError(ShmError, MemoryError, OSError):
    """/dev/shm (or the address space) cannot hold the segment."""

    code = SharedMemoryError.OutOfResources


class UnknownShmError(ShmError, OSError):
    """An OS failure with no better code."""

    code = SharedMemoryError.UnknownError


class HeaderError(ShmError, ValueError):
    """A segment's header is corrupt, truncated, foreign or of another kind."""

    code = SharedMemoryError.UnknownError


class WrongKindError(HeaderError, NotFoundError):
    """The segment holds another kind of payload (a table, not an array...): no such array, and which call maps it."""

    code = SharedMemoryError.NotFound


def error_class(code: SharedMemoryError) -> type[ShmError]:
    """The exception a failure with Qt's *code* raises (UnknownShmError for UnknownError and NoError)."""
    for cls in (PermissionDeniedError, InvalidSizeError, InvalidKeyError, AlreadyExistsError,
                NotFoundError, LockError, OutOfResourcesError):
        if cls.code == code:
            return cls
    return UnknownShmError


class _InvalidSizeTypeError(InvalidSizeError, TypeError):
    """A size that is not an int: both an InvalidSizeError and a TypeError."""


for _cls in (
    AccessMode,
    SharedMemoryError,
    ShmError,
    PermissionDeniedError,
    InvalidSizeError,
    InvalidKeyError,
    AlreadyExistsError,
    NotFoundError,
    LockError,
    OutOfResourcesError,
    UnknownShmError,
    HeaderError,
):
    _cls.__module__ = "shmarray"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def user_facing(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """A public function whose ShmErrors show the user's call, not shmarray's internals.

    The frames below the public function name private helpers a user cannot
    act on (an attach failing 8 frames deep); the message says what happened
    and what to do, and the cause is kept where it adds something.
    """

    @functools.wraps(func)
    def public(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except ShmError as exc:
            raise exc.with_traceback(None)  # shmarray's frames below this line tell a user nothing

    return public
