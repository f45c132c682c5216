"""How a reference travels when something other than plain pickle moves it.

A pickled SharedArray, Segment, ring or table handle is a reference: it names
a segment instance on one host (``Segment._reference``). Plain pickle always
writes the reference and a failed unpickle raises. A transport that knows
more (``shmarray.dask``) says so through two context variables, so the rules
live here once and the payload layers only ask:

* ``sending(recipient)``: the host identity of the process the pickle being
  written goes to (``UNKNOWN`` when the transport cannot tell). A reference
  to a segment of another host, or of an unknown one, goes by value: the
  array's bytes (``by_value``).
* ``reading(DEFER)``: a process that only forwards what it receives (Dask's
  scheduler) unpickles references into :class:`Deferred` placeholders that
  attach nothing and pickle back into the same reference, or into the bytes
  when the next hop is on another host.
* ``reading(LENIENT)``: a process whose message loop must not die on one bad
  object (a Dask worker or client reading a message) turns a reference it
  cannot map into an :class:`Unreachable` placeholder, which raises the
  ShmError when the task that received it uses it.

This module is below the payload layers: it knows the OS layer's host
identity and the error classes, nothing else.
"""

from __future__ import annotations

import contextvars
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator

from ._errors import ShmError
from ._os import backend

#: The recipient of the pickle being written is not known (a peer that did
#: not say its host): references to real data go by value, the safe choice.
UNKNOWN = 0
#: Unpickle references as Deferred placeholders (nothing is attached).
DEFER = 1
#: Unpickle references, and turn the ones that cannot be mapped into Unreachable.
LENIENT = 2

#: Appended to the reason of every Unreachable: what the transport that
#: delivered the reference should have done (set by shmarray's Dask hooks
#: in a process without ``shmarray.dask.register``).
unreachable_hint = ""

_RECIPIENT: contextvars.ContextVar[int | None] = contextvars.ContextVar("shmarray_recipient", default=None)
_READING: contextvars.ContextVar[int] = contextvars.ContextVar("shmarray_reading", default=0)

Rebuild = Callable[..., Any]


@contextmanager
def _setting(var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def sending(recipient: int) -> AbstractContextManager[None]:
    """Within: pickles are written for a process of host *recipient* (UNKNOWN if not known)."""
    return _setting(_RECIPIENT, recipient)


def reading(mode: int) -> AbstractContextManager[None]:
    """Within: references are unpickled in *mode* (DEFER or LENIENT; 0 is plain pickle)."""
    return _setting(_READING, mode)


def read_leniently_from_now() -> None:
    """References unpickled from now on in the current context (thread or task) are read LENIENT.

    For a message loop that is already unpickling when shmarray's Dask hooks
    arrive (its first reference imported shmarray): no ``with`` can wrap it.
    """
    _READING.set(LENIENT)


def by_value(host: int) -> bool:
    """Whether a reference to a segment of *host* must travel as its bytes in the pickle being written."""
    recipient = _RECIPIENT.get()
    return recipient is not None and recipient != host


#: The unpickling mode in force (0: plain pickle), checked first by every
#: rebuild function: the context variable's own ``get``, no Python frame.
special: Callable[[], int] = _READING.get


def rebuild_specially(fn: Rebuild, args: tuple[Any, ...], label: str | None, host: int) -> Any:
    """What rebuild function *fn* gives for *args* under the unpickling mode in force (not 0)."""
    if _READING.get() == DEFER:
        return Deferred(fn, args, label, host)
    try:
        with reading(0):
            return fn(*args)
    except Exception as e:  # noqa: BLE001 - one bad reference must not kill the reader's message loop
        return Unreachable(f"{type(e).__name__}: {e}{unreachable_hint}", label)


class Deferred:
    """A reference received by a process that forwards it: nothing attached, nothing mapped.

    It pickles back into the same reference, so the next process attaches
    the segment; when the next process is on another host, it attaches here
    for the moment of pickling and sends the bytes (``by_value``), or, if
    this process cannot map the segment either, an :class:`Unreachable`.
    """

    __slots__ = ("_fn", "_args", "label", "host")

    def __init__(self, fn: Rebuild, args: tuple[Any, ...], label: str | None, host: int) -> None:
        self._fn = fn
        self._args = args
        self.label = label
        self.host = host

    def __reduce_ex__(self, protocol: Any) -> Any:
        if not by_value(self.host):
            return self._fn, self._args
        if self.host and self.host != backend.host_identity():
            return Unreachable, (
                f"ShmError: segment {self.label!r} lives on another host than the process that "
                "forwarded this reference, and on another host than this one: nobody on the way "
                "could read its bytes; send it by value (np.asarray) or run the task on its host",
                self.label)
        try:
            with reading(0):
                obj = self._fn(*self._args)
        except Exception as e:  # noqa: BLE001 - the recipient learns why when it uses the value
            return Unreachable, (f"{type(e).__name__}: {e}", self.label)
        return obj.__reduce_ex__(protocol)

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __sizeof__(self) -> int:
        return 64 + sum(len(a) if isinstance(a, (str, bytes)) else 8 for a in self._args)

    def __repr__(self) -> str:
        return f"<shmarray reference to segment {self.label!r} (not attached here)>"


class Unreachable:
    """A reference that could not be mapped where it arrived; using it raises ShmError.

    A Dask worker or client gets one instead of an exception in its message
    loop (which would drop the connection or the worker): the task that
    receives it fails with the reason as soon as it touches the value.
    """

    __slots__ = ("reason", "label")

    def __init__(self, reason: str, label: str | None) -> None:
        self.reason = reason
        self.label = label

    def error(self) -> ShmError:
        """The error that using this value raises."""
        return ShmError(f"a shmarray reference to segment {self.label!r} arrived where it cannot be "
                        f"used: {self.reason}", self.label)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.error()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    def __getitem__(self, index: Any) -> Any:
        raise self.error()

    def __len__(self) -> int:
        raise self.error()

    def __iter__(self) -> Any:
        raise self.error()

    def __reduce__(self) -> Any:
        return Unreachable, (self.reason, self.label)

    def _fail(self, *args: Any) -> Any:
        raise self.error()

    # Arithmetic and comparisons with arrays fail with the reason too.
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _fail
    __floordiv__ = __mod__ = __pow__ = __matmul__ = __rmatmul__ = __neg__ = __abs__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = __float__ = __int__ = __index__ = _fail
    # A task that writes into it learns why too (not "does not support item assignment").
    __setitem__ = __iadd__ = __isub__ = __imul__ = __itruediv__ = _fail

    def __repr__(self) -> str:
        return f"<shmarray: unusable reference to segment {self.label!r}: {self.reason}>"
