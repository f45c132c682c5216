"""What a sample looks like: the fields a batch ring needs, inferred from a sample, and batches in its structure.

A DataLoader user's dataset returns ndarrays, torch tensors and scalars,
nested in tuples, lists, dicts and namedtuples; a ring stores flat named
fields. :class:`SampleSchema` is the bridge, both ways: it names each leaf of
the first sample (``"0"``, ``"images"``, ``"1.label"``), gives the ring's field
spec (shape and dtype of each), checks every later sample against it with a
message that names the field and both shapes and dtypes, and builds a batch
back in the samples' structure as torch's ``default_collate`` does (tuples
and lists as lists, dicts as dicts, namedtuples as namedtuples, a single
array as a tensor). torch is never imported here: a tensor is read through
its ``.numpy()`` view.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import numpy as np

from ._ring.slots import Slot

__all__ = ["SampleSchema", "Node", "as_leaf", "describe"]

# A sample's structure: ("leaf", name) | ("seq", "tuple" or "list", children)
# | ("dict", keys, children) | ("named", namedtuple type or None, children).
Node = tuple[Any, ...]


def describe(dtype: Any, shape: tuple[int, ...]) -> str:
    return f"{np.dtype(dtype)} {tuple(shape)}"


def as_leaf(value: Any, name: str) -> np.ndarray[Any, Any]:
    """*value* as an ndarray, or a TypeError naming the field when a ring cannot hold it."""
    if isinstance(value, np.ndarray):
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        try:
            return value.detach().cpu().numpy()  # type: ignore[no-any-return]
        except TypeError:
            raise TypeError(f"field {name!r} is a torch {value.dtype} tensor, which has no NumPy dtype; "
                            "convert it in the dataset (e.g. .float())") from None
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"field {name!r} is a {type(value).__name__}: a ring holds fixed-shape arrays, "
                        "tensors and numbers; leave it out of the samples or encode it as numbers")
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise TypeError(f"field {name!r} is a {type(value).__name__}, which NumPy reads as objects; a ring "
                        "holds fixed-shape arrays, tensors and numbers")
    return arr


def _child(parent: str, part: Any, index: bool) -> str:
    if index:
        return f"{parent}[{part}]"
    return f"{parent}.{part}" if parent else str(part)


class SampleSchema:
    """The fields of one sample and the structure they sit in; a ``fill`` for :class:`RingCollate`.

    Build with :meth:`infer` (from a sample) or :meth:`explicit` (from
    ``{name: (shape, dtype)}`` and a sample for the structure). As a fill it
    checks every sample against the fields (a mismatch names the field, the
    expected and the actual dtype and shape) and stacks them into the slot;
    :meth:`batch` rebuilds a batch's structure as ``default_collate`` does
    (tuples and lists give lists, dicts dicts, namedtuples namedtuples).
    """

    def __init__(self, tree: Node, fields: dict[str, tuple[tuple[int, ...], np.dtype[Any]]], *,
                 inferred: bool = False) -> None:
        self.tree = tree
        self.fields = fields
        self.inferred = inferred

    @classmethod
    def infer(cls, sample: Any) -> SampleSchema:
        """The schema of *sample*: arrays, tensors and scalars in tuples, lists, dicts and namedtuples."""
        fields: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}

        def walk(value: Any, name: str) -> Node:
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                return ("named", type(value),
                        tuple(walk(v, _child(name, f, False)) for f, v in zip(value._fields, value)))
            if isinstance(value, Mapping):
                keys = tuple(value)
                return ("dict", keys, tuple(walk(value[k], _child(name, k, False)) for k in keys))
            if isinstance(value, (tuple, list)):
                kind = "tuple" if isinstance(value, tuple) else "list"
                return ("seq", kind, tuple(walk(v, _child(name, i, True)) for i, v in enumerate(value)))
            leaf = name or "sample"
            if leaf in fields:
                raise ValueError(f"two fields of the sample are both named {leaf!r}; give sample_fields")
            arr = as_leaf(value, leaf)
            fields[leaf] = (arr.shape, arr.dtype)
            return ("leaf", leaf)

        tree = walk(sample, "")
        if not fields:
            raise ValueError("the first sample holds no arrays, tensors or numbers to batch")
        return cls(tree, fields, inferred=True)

    @classmethod
    def explicit(cls, sample_fields: Mapping[str, Any], sample: Any) -> SampleSchema:
        """*sample_fields* (``{name: (shape, dtype)}``) in the structure of *sample* (dict, tuple or one value)."""
        fields = {}
        for name, spec in sample_fields.items():
            if not isinstance(spec, (tuple, list)) or len(spec) != 2:
                raise TypeError(f"field {name!r}: give (shape, dtype), not {spec!r}")
            shape = (spec[0],) if isinstance(spec[0], int) else tuple(spec[0])
            fields[name] = (shape, np.dtype(spec[1]))
        names = tuple(fields)
        leaves = tuple(("leaf", n) for n in names)
        tree: Node
        if isinstance(sample, Mapping):
            tree = ("dict", names, leaves)
        elif isinstance(sample, tuple) and hasattr(sample, "_fields") and len(sample) == len(names):
            tree = ("named", type(sample), leaves)
        elif isinstance(sample, (tuple, list)) and len(sample) == len(names) and (
                len(names) > 1 or isinstance(sample, tuple)):
            tree = ("seq", "tuple" if isinstance(sample, tuple) else "list", leaves)
        elif len(names) == 1:
            tree = leaves[0]
        else:
            raise TypeError(f"the first sample is a {type(sample).__name__}; with sample_fields {list(names)} "
                            "give dicts of them, or tuples of them in that order")
        return cls(tree, fields, inferred=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # Workers only flatten: namedtuple types stay here (they may not pickle, e.g. made in a function).
        def strip(node: Node) -> Node:
            if node[0] == "leaf":
                return node
            return (node[0], None if node[0] == "named" else node[1], tuple(strip(c) for c in node[2]))

        return SampleSchema, (strip(self.tree), self.fields), {"inferred": self.inferred}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.inferred = state["inferred"]

    def flatten(self, sample: Any, k: int = 0) -> dict[str, np.ndarray[Any, Any]]:
        """Each field's value in *sample* (sample number *k* of a batch), checked against the fields."""
        out: dict[str, np.ndarray[Any, Any]] = {}
        self._walk(self.tree, sample, "", k, out)
        return out

    def _walk(self, node: Node, value: Any, name: str, k: int, out: dict[str, np.ndarray[Any, Any]]) -> None:
        where = " (fields inferred from the first sample; give sample_fields= to set them)" if self.inferred else ""
        kind = node[0]
        if kind == "leaf":
            field = node[1]
            shape, dtype = self.fields[field]
            arr = as_leaf(value, field)
            if arr.shape != shape or not np.can_cast(arr.dtype, dtype, "same_kind"):
                raise ValueError(f"sample {k}: field {field!r} is {describe(arr.dtype, arr.shape)}, "
                                 f"expected {describe(dtype, shape)}{where}")
            out[field] = arr
            return
        what = f"sample {k}" + (f" at {name!r}" if name else "")
        if kind == "dict":
            if not isinstance(value, Mapping):
                raise TypeError(f"{what} is a {type(value).__name__}; the first sample had a dict there")
            for key, child in zip(node[1], node[2]):
                if key not in value:
                    raise KeyError(f"{what} has no field {key!r} (it has {sorted(map(str, value))})")
                self._walk(child, value[key], _child(name, key, False), k, out)
            if self.inferred and len(value) != len(node[1]):
                extra = sorted(str(x) for x in value if x not in node[1])
                raise ValueError(f"{what} has fields {extra} that the first sample did not have{where}")
            return
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{what} is a {type(value).__name__}; the first sample had a "
                            f"{'tuple' if kind == 'named' else node[1]} of {len(node[2])} there")
        if len(value) != len(node[2]):
            raise ValueError(f"{what} has {len(value)} values; the first sample had {len(node[2])}{where}")
        for i, (child, v) in enumerate(zip(node[2], value)):
            self._walk(child, v, _child(name, i, True), k, out)

    def __call__(self, slot: Slot, samples: Sequence[Any]) -> int:
        """Check *samples* and stack them into *slot* (the fill of a ring made for this schema)."""
        n = len(samples)
        columns: dict[str, list[np.ndarray[Any, Any]]] = {name: [] for name in self.fields}
        for k, sample in enumerate(samples):
            for name, arr in self.flatten(sample, k).items():
                columns[name].append(arr)
        if n:
            for name, col in columns.items():
                view = slot[name]
                if view.shape[0] < n:
                    raise ValueError(f"field {name!r} holds {view.shape[0]} rows per slot; a batch of {n} "
                                     "samples does not fit")
                np.stack(col, axis=0, out=view[:n], casting="same_kind")
        return n

    def batch(self, columns: Mapping[str, Any]) -> Any:
        """The batch of *columns* (``{field: batched tensor}``) in the samples' structure."""
        return _build(self.tree, columns)


def _build(node: Node, columns: Mapping[str, Any]) -> Any:
    # A module function, not a closure: a recursive closure is a reference cycle, which
    # would keep each batch's tensors alive until the garbage collector runs.
    kind = node[0]
    if kind == "leaf":
        return columns[node[1]]
    parts = [_build(c, columns) for c in node[2]]
    if kind == "dict":
        return dict(zip(node[1], parts))
    if kind == "named" and node[1] is not None:
        return node[1](*parts)
    return parts
