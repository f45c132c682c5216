"""Dask distributed glue: SharedArrays and table handles by reference on one host, by value across hosts.

::

    from distributed import Client
    import shmarray, shmarray.dask

    client = Client(...)
    shmarray.dask.register(client)          # client, scheduler, every worker now and later
    a = shmarray.share("frames", big)       # lives in /dev/shm
    total = client.submit(np.sum, a).result()   # the worker attaches: ~100 bytes travel

Without ``register``: SharedArray's own Dask serializer, ``sizeof`` and token
are installed whenever shmarray and ``distributed`` are both imported
(``shmarray._daskhook``), in the client and in every worker, so Dask never
copies a SharedArray as an ndarray: given to ``submit``, ``map``, ``scatter``
(direct or not) or returned by a task, it goes as a reference, and writes
are seen. No process knows its peers' hosts then, so the reference goes
even to another host, where it cannot be mapped: the task that uses it
fails with a ShmError naming ``shmarray.dask.register(client)`` (the worker
stays up; Dask's unpickling reads references leniently). Never a silent
copy, never another host's segment of the same name. ``register`` adds the
hosts, and with them the bytes for other hosts:

How a transfer is decided. Every process that runs this module adds its host
identity (boot id and /dev/shm device, ``Segment``'s reference rules; never
the IP address) to the handshake of each Dask connection it opens or
accepts. When Dask writes a message, the identity of the process at the
other end of that connection is in force while the message is pickled
(``shmarray._transfer.sending``): a SharedArray, a view of one or a
:class:`shmarray.TableHandle` whose segment lives on the recipient's host
goes as a reference; to any other host, or to a peer that did not say its
host, it goes as its bytes (read straight from the mapping; it arrives as an
ndarray, or as a handle holding the table). Reading a message never raises
for a reference: one that cannot be mapped where it arrives becomes a value
that raises ShmError when the task uses it, so the worker and its
connection stay up.

The scheduler only forwards tasks: it unpickles a graph's references into
placeholders that attach nothing and pickle back into the same reference
(or, for a worker on another host, into the bytes: the scheduler then maps
the segment for the moment of sending, if it runs on the segment's host).

Lifetime: a task's argument is a reference, not a holder. Keep the SharedArray
(or make it ``persistent=True``) until the futures that use it are done, as
with a process pool. A task result that is a SharedArray lives in the
worker's memory like any result: the segment stays while Dask holds the key,
and goes when the last future is released (unless persistent).

``dask.sizeof`` of a SharedArray or handle is the size of its reference, so
Dask neither counts the shared pages once per worker nor spills them for
their size. The worker memory monitor still sees them: a worker's RSS counts
every shared page it has touched (once per worker that touched it). When a
worker does spill one (its RSS passed the spill threshold), it spills the
bytes, never a reference, so nothing is lost.

Workers that join later get the plugin when they register, and report their
host to the scheduler then (before their first task, in every run of the
tests). Until the scheduler has heard a worker's host it sends that worker
bytes (from the segment's host) rather than a reference it might not map. ``--preload shmarray.dask`` (or
``preload=["shmarray.dask"]``) makes a worker's very first connection carry
its host.
"""

from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from . import _daskhook, _transfer
from ._array import SharedArray, create
from ._os import backend

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    from distributed import Client, Scheduler, Worker

__all__ = ["register", "install", "from_shared", "to_shared", "dask_setup", "HANDSHAKE_KEY"]

#: The key under which a process's host identity travels in Dask's connection handshake.
HANDSHAKE_KEY = "shmarray-host"
_PLUGIN = "shmarray"
_HANDLER = "shmarray_host"
_installed = False
# Hosts of peers by listening address, for connections whose handshake came
# from a process that had not run install() yet (the scheduler's pooled
# connections to workers that were already running).
_PEER_HOSTS: dict[str, int] = {}


def _recipient(context: dict[str, Any] | None) -> int | None:
    """The host identity of a message's recipient from Dask's serialization context (UNKNOWN if unsaid)."""
    if not context:
        return None
    peer = context.get("recipient")
    if not isinstance(peer, dict):
        return _transfer.UNKNOWN
    host = peer.get(HANDSHAKE_KEY)
    if host is None:
        host = _PEER_HOSTS.get(peer.get("address", ""))
    return host if isinstance(host, int) and host > 0 else _transfer.UNKNOWN


def install() -> None:
    """Install shmarray's transfer rules in this process (idempotent); ``register`` does it everywhere.

    Adds this host's identity to Dask's connection handshake, pickles
    messages for the connection's recipient, reads messages leniently,
    and tells SharedArray's Dask serializer (installed at import) each
    recipient's host, so that another host gets bytes.
    """
    global _installed
    if _installed:
        return
    import distributed.protocol
    from distributed.comm import core as comm_core

    handshake_info = comm_core.Comm.handshake_info

    @functools.wraps(handshake_info)
    def with_host(self: Any) -> dict[str, Any]:
        info: dict[str, Any] = handshake_info(self)
        info[HANDSHAKE_KEY] = backend.host_identity()
        return info

    comm_core.Comm.handshake_info = with_host

    dumps = distributed.protocol.dumps
    loads = distributed.protocol.loads

    @functools.wraps(dumps)
    def dumps_for_recipient(msg: Any, serializers: Any = None, on_error: str = "message",
                            context: dict[str, Any] | None = None, frame_split_size: Any = None) -> Any:
        recipient = _recipient(context)
        if recipient is None:
            return dumps(msg, serializers=serializers, on_error=on_error, context=context,
                         frame_split_size=frame_split_size)
        with _transfer.sending(recipient):
            return dumps(msg, serializers=serializers, on_error=on_error, context=context,
                         frame_split_size=frame_split_size)

    @functools.wraps(loads)
    def loads_leniently(frames: Any, deserialize: bool = True, deserializers: Any = None) -> Any:
        with _transfer.reading(_transfer.LENIENT):
            return loads(frames, deserialize=deserialize, deserializers=deserializers)

    # comm.utils calls these through the package attribute at each message.
    distributed.protocol.dumps = dumps_for_recipient
    distributed.protocol.loads = loads_leniently

    # SharedArray's serializer (installed at import, _daskhook) now knows each recipient's host.
    _daskhook.recipient_of = _recipient
    _transfer.unreachable_hint = ""  # another host now gets bytes: an Unreachable is a forged or gone reference
    _daskhook.arm()
    _installed = True


# -- the processes of a cluster ----------------------------------------------------


def _defer_graphs(scheduler: Scheduler) -> None:
    """The scheduler unpickles the graphs it receives into placeholders: it attaches nothing."""
    import distributed.scheduler as sched

    if getattr(sched.deserialize, "_shmarray", False):
        return
    deserialize = sched.deserialize

    @functools.wraps(deserialize)
    def deferring(*args: Any, **kwargs: Any) -> Any:
        with _transfer.reading(_transfer.DEFER):
            return deserialize(*args, **kwargs)

    deferring._shmarray = True  # type: ignore[attr-defined]
    sched.deserialize = deferring


def _redecide(data: dict[Any, Any]) -> dict[Any, Any]:
    """Data the scheduler forwards without reading it: ours becomes placeholders, decided again per recipient.

    The sender pickled it for the scheduler, whose host may not be the
    final recipient's.
    """
    from distributed.protocol import Serialized, deserialize, to_serialize

    out = {}
    for key, value in data.items():
        if isinstance(value, Serialized) and value.header.get("sub-header", {}).get("shmarray"):
            with _transfer.reading(_transfer.DEFER):
                value = to_serialize(deserialize(value.header, value.frames))
        out[key] = value
    return out


def _forward_by_recipient(scheduler: Scheduler) -> None:
    """``scatter(direct=False)`` and the scheduler's ``gather`` re-decide each SharedArray for its recipient."""
    scatter = scheduler.handlers["scatter"]
    gather = scheduler.handlers["gather"]
    if getattr(scatter, "_shmarray", False):
        return

    @functools.wraps(scatter)
    async def scatter_by_recipient(*args: Any, data: dict[Any, Any], **kwargs: Any) -> Any:
        return await scatter(*args, data=_redecide(data), **kwargs)

    @functools.wraps(gather)
    async def gather_by_recipient(*args: Any, **kwargs: Any) -> Any:
        result = await gather(*args, **kwargs)
        if isinstance(result, dict) and isinstance(result.get("data"), dict):
            result["data"] = _redecide(result["data"])
        return result

    scatter_by_recipient._shmarray = True  # type: ignore[attr-defined]
    scheduler.handlers["scatter"] = scatter_by_recipient
    scheduler.handlers["gather"] = gather_by_recipient


def _learn_worker_host(scheduler: Scheduler) -> Callable[..., Any]:
    def shmarray_host(comm: Any = None, worker: str = "", host: int = 0) -> int:
        # The worker's stream to us was opened before it ran this module;
        # its recipient info is what our pickling reads for every task we send it.
        if not host:
            return backend.host_identity()
        _PEER_HOSTS[worker] = host
        stream = scheduler.stream_comms.get(worker)
        inner = getattr(stream, "comm", None)
        if inner is not None:
            inner.remote_info[HANDSHAKE_KEY] = host
        return backend.host_identity()

    return shmarray_host


class _SchedulerPlugin(SchedulerPlugin):  # type: ignore[misc]
    """Installs the rules in the scheduler and answers workers that report their host."""

    idempotent = True

    async def start(self, scheduler: Scheduler) -> None:
        install()
        _defer_graphs(scheduler)
        _forward_by_recipient(scheduler)
        scheduler.handlers[_HANDLER] = _learn_worker_host(scheduler)

    async def close(self) -> None:
        return None


class _WorkerPlugin(WorkerPlugin):  # type: ignore[misc]
    """Installs the rules in a worker, tells the scheduler its host, and spills SharedArrays by value."""

    idempotent = True

    async def setup(self, worker: Worker) -> None:
        install()
        _spill_by_value(worker)
        try:
            scheduler_host = await worker.scheduler.shmarray_host(worker=worker.address,
                                                                  host=backend.host_identity())
        except Exception:  # noqa: BLE001 - a scheduler without our plugin: new connections still say the host
            scheduler_host = 0
        stream = getattr(worker.batched_stream, "comm", None)
        if stream is not None and scheduler_host:
            stream.remote_info[HANDSHAKE_KEY] = scheduler_host
        # Idle pooled connections predate the handshake: new ones carry it.
        worker.rpc.collect()

    def teardown(self, worker: Worker) -> None:
        return None


def _spill_by_value(worker: Worker) -> None:
    """Make the worker's spill-to-disk write a SharedArray's bytes (a reference on disk would not keep it)."""
    data = worker.data
    try:
        slow = data._slow_uncached
    except AttributeError:
        slow = getattr(data, "slow", None)
    dump = getattr(slow, "dump", None)
    if dump is None or getattr(dump, "_shmarray", False):
        return

    def dump_by_value(value: Any) -> Any:
        with _transfer.sending(_transfer.UNKNOWN):
            return dump(value)

    dump_by_value._shmarray = True  # type: ignore[attr-defined]
    slow.dump = dump_by_value


def register(client: Client) -> Any:
    """Install shmarray's serialisation on *client*, its scheduler and every present and future worker.

    Idempotent. After it, a SharedArray (or view) or TableHandle that Dask
    moves between processes of one host (task arguments, ``scatter``,
    results, worker-to-worker transfers) moves as a ~100-byte reference, and
    writes are seen by everyone; to a process on another host it moves as
    its bytes. See the module docs for the scheduler and lifetime rules.

    Parameters
    ----------
    client : distributed.Client
        The client of the cluster.

    Returns
    -------
    None or coroutine
        With an asynchronous client, a coroutine to await.
    """
    install()
    if client.asynchronous:
        return _register(client)
    client.sync(_register, client)
    return None


async def _register(client: Client) -> None:
    await client.register_plugin(_SchedulerPlugin(), name=_PLUGIN + "-scheduler")
    await client.register_plugin(_WorkerPlugin(), name=_PLUGIN + "-worker")
    # Idle pooled connections predate the handshake: new ones carry it.
    client.rpc.collect()


def dask_setup(worker: Worker) -> None:
    """``--preload shmarray.dask``: install the rules before the worker's first connection."""
    install()


# -- dask.array --------------------------------------------------------------------


def from_shared(a: SharedArray, chunks: Any = "auto", *, name: str | None = None) -> dask.array.Array:
    """A dask array over SharedArray *a*: every chunk is a view of *a* (a ~100-byte reference in the graph).

    Tasks on workers of this host read (and may write) *a*'s memory in place;
    keep *a* alive while the graph runs. (``da.from_array(a)`` copies its
    chunks into the graph instead.)

    Parameters
    ----------
    a : SharedArray
        The array.
    chunks : optional
        As ``dask.array.from_array``'s (default "auto").
    name : str, optional
        The graph layer's name (default a fresh one).

    Returns
    -------
    dask.array.Array

    Raises
    ------
    TypeError
        When *a* is not a SharedArray.
    """
    import itertools

    import dask.array as da
    from dask.array.core import normalize_chunks, slices_from_chunks

    if not isinstance(a, SharedArray) or a.segment is None:
        raise TypeError(f"from_shared() needs a SharedArray that lives in a segment, not {type(a).__name__}")
    chunks = normalize_chunks(chunks, a.shape, dtype=a.dtype)
    name = name or f"shmarray-{a.key}-{uuid.uuid4().hex[:12]}"
    indices = itertools.product(*(range(len(c)) for c in chunks))
    graph = {(name, *idx): a[slc] for idx, slc in zip(indices, slices_from_chunks(chunks))}
    return da.Array(graph, name, chunks, dtype=a.dtype, meta=np.empty((0,) * a.ndim, dtype=a.dtype))


def to_shared(x: dask.array.Array, key: str, *, persistent: bool = False, **compute_kwargs: Any) -> SharedArray:
    """Compute dask array *x* into a new SharedArray *key*: each chunk is written in place by its worker.

    On failure no segment is left behind.

    Parameters
    ----------
    x : dask.array.Array
        The array to compute.
    key : str
        The new segment's key.
    persistent : bool, optional
        Keep the segment after its last holder goes, until ``shmarray.unlink(key)``.
    **compute_kwargs
        Passed to ``compute`` (with a distributed client, for example
        ``workers=[...]``).

    Returns
    -------
    SharedArray
        The result.

    Raises
    ------
    AlreadyExistsError
        When *key* exists.
    ShmError
        When a chunk's task ran on another host, which cannot reach this
        segment (rather than leaving zeros).
    """
    import dask.array as da

    out = create(key, x.shape, x.dtype, persistent=persistent)
    try:
        marks = da.map_blocks(_store_block, x, out=out, dtype=np.int8, chunks=(1,) * x.ndim,
                              name=f"shmarray-store-{uuid.uuid4().hex[:12]}")
        marks.sum().compute(**compute_kwargs)
    except BaseException:
        out.close()
        if persistent:
            from ._admin import unlink

            unlink(key)
        raise
    return out


def _store_block(block: np.ndarray, out: Any = None, block_info: Any = None) -> np.ndarray:
    """Write one chunk into the shared target (a task: *out* arrives as a reference)."""
    if not isinstance(out, SharedArray):
        from ._errors import ShmError

        if isinstance(out, _transfer.Unreachable):
            raise out.error()
        raise ShmError("to_shared(): a chunk was computed on another host, where the target segment "
                       "cannot be mapped; pass workers= of this host", None)
    region = tuple(slice(lo, hi) for lo, hi in block_info[0]["array-location"])
    out[region] = block
    return np.ones((1,) * block.ndim, dtype=np.int8)
