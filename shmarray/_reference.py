"""References: what a pickled shmarray object carries, and the one way it is rebuilt.

A SharedArray (or any view of one), a table handle, a Segment and a batch
ring pickle as a reference to the segment *instance* they live in, not as
its bytes: the key (or native key), the directory, the access mode, and
which instance (this host's identity and the incarnation drawn when the
segment was created), so a reference never reads a segment that replaced
the one it was made from, nor one of another host.

On the wire every reference is ``entry, (fields, detail)``: *entry* is the
kind's module-level rebuild function (the one global a pickle names),
*fields* a :class:`Reference` as a plain tuple, *detail* what the kind needs
besides the segment (a view's geometry, a ring's ``on_lost``). Every entry
calls :func:`rebuild`, which holds what they share, once: the transport's
reading modes (``_transfer``: a forwarding scheduler defers, a message loop
reads leniently), attaching the instance (``Segment._of_instance``: nothing
is opened in a process that holds it already), the kind's builder, and the
detach when the builder refuses what it found.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

from ._errors import AccessMode, user_facing
from ._transfer import by_value, rebuild_specially, special

__all__ = ["Reference", "rebuild", "reduce", "attach_instances_with"]

_MODES = (AccessMode.ReadOnly, AccessMode.ReadWrite)


class _Attached(Protocol):
    """What attaching an instance gives: a Segment (``_segment``, which sits above this module)."""

    @property
    def key(self) -> str | None: ...
    @property
    def native_key(self) -> str | None: ...
    _dir: str | None
    def _reference(self) -> tuple[int, int]: ...
    def detach(self) -> bool: ...


#: How an instance is attached: ``Segment._of_instance``, installed by ``_segment`` as it loads
#: (this module sits below it, so that Segment pickles through it too).
_attach: Callable[[str | None, str | None, AccessMode, int, int, str | None], _Attached] | None = None


def attach_instances_with(attach: Callable[[str | None, str | None, AccessMode, int, int, str | None],
                                           _Attached]) -> None:
    """Install how a reference's instance is attached (called once, by ``_segment``)."""
    global _attach
    _attach = attach


class Reference(NamedTuple):
    """Which segment instance a pickled object lives in."""

    key: str | None
    native: str | None  # the OS name, for a segment attached by native key (key None)
    mode: int | None  # an AccessMode; None: a detached Segment, which names a key and no instance
    host: int  # the host identity of the segment's directory (0: none)
    incarnation: int  # drawn at creation (0: none, e.g. a foreign segment)
    dir: str | None  # the segment directory; None: the default

    @classmethod
    def to(cls, seg: _Attached, mode: AccessMode | None) -> Reference:
        """The reference to the instance *seg* is attached to (mode None: to its key only)."""
        host, incarnation = seg._reference()
        return cls(seg.key, seg.native_key if seg.key is None else None, None if mode is None else int(mode),
                   host, incarnation, seg._dir)

    @property
    def label(self) -> str | None:
        """The key, else the native key: what messages name."""
        return self.key if self.key is not None else self.native

    def by_value(self) -> bool:
        """Whether the pickle being written goes to another host, so the object must travel as its bytes."""
        return by_value(self.host)


#: A kind's builder: the object a reference names, from the Segment attached to its instance
#: (None for a reference with no mode) and the kind's detail. It raises ShmError when what it
#: finds does not fit the reference (a view outside the array, another kind of payload).
Build = Callable[[Any, Reference, Any], Any]


def reduce(entry: Callable[..., Any], ref: Reference, detail: Any = ()) -> tuple[Any, ...]:
    """What a picklable kind's ``__reduce__`` returns: its *entry*, then the reference and its *detail*."""
    return entry, (tuple(ref), detail)


@user_facing
def rebuild(entry: Callable[..., Any], build: Build, fields: tuple[Any, ...], detail: Any) -> Any:
    """Unpickle a reference: under the transport's mode, attach its instance and let *build* make the object.

    *entry* is the kind's rebuild function (a deferred reference pickles
    back into it); the Segment attached for *build* is detached again when
    *build* raises.
    """
    if special():
        return rebuild_specially(entry, (fields, detail), fields[0] if fields[0] is not None else fields[1],
                                 fields[3])
    ref = tuple.__new__(Reference, fields)
    if ref.mode is None:
        return build(None, ref, detail)
    assert _attach is not None  # _segment is imported before anything can be pickled
    seg = _attach(ref.key, ref.native, _MODES[ref.mode], ref.host, ref.incarnation, ref.dir)
    try:
        return build(seg, ref, detail)
    except BaseException:
        seg.detach()
        raise
