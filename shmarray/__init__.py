"""shmarray: share NumPy arrays and Arrow tables between processes, zero-copy.

The core is :class:`Segment`, Qt's ``QSharedMemory`` model on POSIX shared
memory: a named segment with create/attach/detach, a segment lock that
survives its holder's death, and Qt's error codes.

How the code is laid out (the layers, one line a module, where each byte
layout lives): CONTRIBUTING.md. The public surface is written once, in
``__init__.pyi`` beside this file.
"""

from __future__ import annotations

import ast
import importlib
import os
from typing import Any

__version__ = "0.1.0"


def _read_surface() -> dict[str, str]:
    """Public name -> defining module, from the stub beside this file (the one table of the public surface)."""
    with open(os.path.join(os.path.dirname(__file__), "__init__.pyi"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {alias.asname or alias.name: "." * node.level + (node.module or "")
            for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}


_PUBLIC = _read_surface()
__all__ = sorted(_PUBLIC)

# What `import shmarray` loads: the segment, arrays, errors and admin calls.
# Arrow, the batch ring, torch, the listing and the doctor load on first use:
# a worker that only attaches arrays should not pay for them at import
# (a large share of the package's import time: benchmarks/results/notes.md).
_EAGER = ("._errors", "._segment", "._array", "._admin", "._cuda")
for _name, _module in _PUBLIC.items():
    if _module in _EAGER:
        globals()[_name] = getattr(importlib.import_module(_module, __name__), _name)
del _name, _module

# SharedArray's Dask serializer, sizeof and token, whenever Dask is imported
# too (before or after us): without them Dask copies it as an ndarray (_daskhook).
importlib.import_module("._daskhook", __name__).arm()


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'shmarray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    # Public names only: not the helpers this module imports, nor its private submodules.
    loaded = {name for name in ("qt", "dask") if name in globals()}  # public subpackages, once imported
    return sorted(set(_PUBLIC) | loaded | {"__version__"})
