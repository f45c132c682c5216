"""SharedArray's Dask hooks (serializer, ``sizeof``, token), installed whenever shmarray and Dask are both imported.

Dask's own hooks for ``numpy.ndarray`` would take a SharedArray (a
subclass) and copy it: ``scatter`` and task results would arrive as copies
that a task writes into, and nobody else sees the writes. So whichever of
shmarray and Dask is imported second installs SharedArray's own hooks in
their registries (``dask_serialize``/``dask_deserialize``, ``dask.sizeof``,
``normalize_token``), without ``shmarray.dask.register`` and without shmarray
importing Dask: :func:`arm`, run by ``import shmarray``, installs them at
once for the Dask modules already imported, and watches the imports for the
others. Every process of a cluster gets them: a worker imports shmarray as
soon as it unpickles the first SharedArray (the serialized type names it).

The serializer pickles the array, so it travels as ``SharedArray.__reduce_ex__``
decides: a reference. Where ``shmarray.dask.install`` ran (``register``), the
transport knows the recipient's host and :data:`recipient_of` says it, so
another host gets the bytes. Without it nobody knows the recipient's host;
the reference goes anyway (a copy that a task writes into would lose the
writes silently), and where it cannot be mapped it becomes a value that
raises ShmError naming ``shmarray.dask.register(client)`` when used.
"""

from __future__ import annotations

import functools
import pickle
import sys
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

from . import _transfer
from ._array import SharedArray

#: Set by ``shmarray.dask.install()``: the host of a message's recipient from
#: Dask's serialization context (None when not sent to a process). None here:
#: this process has no transfer rules, and references go as they are.
recipient_of: Callable[[dict[str, Any] | None], int | None] | None = None

#: What a process that received an unmappable reference without the transfer rules is told to do.
REGISTER_HINT = ("Dask sent this reference without shmarray's transfer rules: call "
                 "shmarray.dask.register(client) once, and Dask sends SharedArrays to processes on "
                 "other hosts as their bytes")


def serialize_array(x: SharedArray, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Dask's serializer for a SharedArray: its pickle (a reference, or its bytes for another host)."""
    buffers: list[Any] = []
    recipient = recipient_of(context) if recipient_of is not None else None
    if recipient is None:
        frame = pickle.dumps(x, protocol=5, buffer_callback=buffers.append)
    else:
        with _transfer.sending(recipient):
            frame = pickle.dumps(x, protocol=5, buffer_callback=buffers.append)
    return {"shmarray": 1}, [frame, *(b.raw() for b in buffers)]


def deserialize_array(header: dict[str, Any], frames: list[Any]) -> Any:
    """Dask's deserializer for a SharedArray (read leniently: see :func:`_lenient`)."""
    if _transfer.special():
        return pickle.loads(frames[0], buffers=frames[1:])
    with _transfer.reading(_transfer.LENIENT):
        return pickle.loads(frames[0], buffers=frames[1:])


def _lenient(loads: Callable[..., Any]) -> Callable[..., Any]:
    """Dask's unpickler, reading references leniently.

    A reference that cannot be mapped here (another host) becomes a value
    that raises ShmError, naming register(client), when the task uses it:
    raising while Dask reads a message would kill the worker instead.
    """
    @functools.wraps(loads)
    def reading_leniently(*args: Any, **kwargs: Any) -> Any:
        if _transfer.special():  # the scheduler's DEFER (register), or already lenient
            return loads(*args, **kwargs)
        with _transfer.reading(_transfer.LENIENT):
            return loads(*args, **kwargs)

    reading_leniently._shmarray = True  # type: ignore[attr-defined]
    return reading_leniently


def sizeof_array(x: SharedArray) -> int:
    """What Dask counts for a SharedArray: its reference (its pages are not the worker's own)."""
    if x.segment is None:
        return int(x.nbytes)
    return len(pickle.dumps(x))


def token(x: SharedArray) -> tuple[str, str]:
    """A token never given twice.

    The bytes can change under the same reference (that is the point):
    hashing them costs a pass over the array, and a token repeated for the
    same contents would let Dask hand back an earlier result instead of
    running a task that writes.
    """
    return "shmarray.SharedArray", uuid.uuid4().hex


def _sizeof_handle(h: Any) -> int:
    if h.by_value:
        return int(h._value.nbytes)
    return 128


def _install_serializers(mod: ModuleType) -> None:
    mod.dask_serialize.register(SharedArray)(serialize_array)
    mod.dask_deserialize.register(SharedArray)(deserialize_array)


def _install_lenient_loads(unpickler: ModuleType) -> None:
    # Every unpickling of a Dask message goes through this module attribute.
    if not getattr(unpickler.loads, "_shmarray", False):
        original = unpickler.loads
        unpickler.loads = _lenient(original)  # type: ignore[attr-defined]
        if recipient_of is None:
            _transfer.unreachable_hint = "; " + REGISTER_HINT
        if _unpickling_in(original):
            # shmarray is being imported by the unpickling of a message's first
            # reference, in a worker: that reference is read leniently too.
            _transfer.read_leniently_from_now()


def _unpickling_in(loads: Callable[..., Any]) -> bool:
    """Whether this import runs inside a call of Dask's *loads* (a bounded walk up the stack)."""
    code = getattr(loads, "__code__", None)
    frame = sys._getframe(1)
    for _ in range(200):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _install_sizeof(mod: ModuleType) -> None:
    mod.sizeof.register(SharedArray)(sizeof_array)

    def table_handle() -> None:  # on the first sizeof of an object of ours that is not a SharedArray
        from ._arrow import TableHandle

        mod.sizeof.register(TableHandle)(_sizeof_handle)

    mod.sizeof.register_lazy("shmarray")(table_handle)


def _install_token(mod: ModuleType) -> None:
    mod.normalize_token.register(SharedArray)(token)


# Dask module -> what to install in it once it has run.
_PENDING: dict[str, Callable[[ModuleType], None]] = {
    "distributed.protocol.serialize": _install_serializers,
    "distributed.protocol.pickle": _install_lenient_loads,
    "dask.sizeof": _install_sizeof,
    "dask.tokenize": _install_token,
}


class _ThenInstall:
    """A module's loader, then our hook once the module has run (wrapt's post-import hook, in small)."""

    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: Any) -> ModuleType | None:
        create: Callable[[Any], ModuleType | None] | None = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # inspect, reload: the real loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Watcher:
    """A meta path finder that only wraps the loaders of the Dask modules still pending."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        hook = _PENDING.pop(name, None)
        if hook is None:
            return None
        if not _PENDING:
            _unwatch()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenInstall(spec.loader, hook)
        return spec


_WATCHER = _Watcher()


def _unwatch() -> None:
    try:
        sys.meta_path.remove(_WATCHER)
    except ValueError:
        pass


def arm() -> None:
    """Install the hooks in the Dask modules already imported, and watch the imports for the others.

    Idempotent; imports nothing of Dask.
    """
    for name in list(_PENDING):
        mod = sys.modules.get(name)
        if mod is not None:
            _PENDING.pop(name)(mod)
    if _PENDING and _WATCHER not in sys.meta_path:
        sys.meta_path.insert(0, _WATCHER)
    elif not _PENDING:
        _unwatch()
