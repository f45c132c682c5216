"""The layout holds: each layer imports only the layers below it, and the payload layers use of a
Segment only its public API and the interface it declares (``_segment.PAYLOAD_INTERFACE``)."""

from __future__ import annotations

import ast
import pathlib

import shmarray
from shmarray import _segment

PKG = pathlib.Path(shmarray.__file__).parent

# Bottom to top; a module may import (at module level or inside a function) only modules of its own
# rank or below. Leaves that import nothing of shmarray may be used by any layer.
RANKS = [
    {"_errors", "_display", "_progress"},
    {"_os", "_os._linux", "_os._names", "_os._qtipc", "_cuda"},
    {"_control", "_reuse"},
    {"_lock"},
    {"_attachment", "_stash"},
    {"_transfer"},
    {"_segment"},
    {"_header", "_npy"},
    {"_array", "_arrow", "_ring", "_ring.layout", "_ring.slots", "_ring.ring", "_torch"},
    {"_admin", "_doctor", "_qtkeys", "_qtnative", "_daskhook"},
    {"_inspect", "qt", "dask"},
    {"_demo"},
    {"_cli", "__main__", "__init__"},
]
# Display hooks sit on the objects they show and call up to the module that writes the rows,
# on first display only (lazily): the one sanctioned upward reference.
UPWARD_OK = {("_segment", "_inspect"), ("_array", "_inspect"), ("_cli", "_demo")}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def _rank(name: str) -> int:
    for i, group in enumerate(RANKS):
        if name in group:
            return i
    raise AssertionError(f"shmarray.{name} is in no layer of tests/test_layers.py: place it")


def _imports(path: pathlib.Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py":
        package = "" if name == "__init__" else name
    else:
        package = name.rsplit(".", 1)[0] if "." in name else ""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, node.module]) if node.module else ".".join(base)
            if node.module is None:  # from . import x: a module, or a name of the package itself
                for a in node.names:
                    sub = ".".join([*base, a.name])
                    out.add(sub if (PKG / f"{sub.replace('.', '/')}.py").exists()
                            or (PKG / sub.replace(".", "/")).is_dir() else ".".join(base) or "__init__")
            else:
                out.add(target)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shmarray."):
            out.add(node.module[len("shmarray."):])
    return {m for m in out if m}


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def test_each_layer_imports_only_the_layers_below():
    bad = []
    for name, path in _modules().items():
        name = name.removesuffix(".__init__") if name.endswith(".__init__") else name
        mine = _rank(name)
        for dep in _imports(path, name):
            dep = dep.removesuffix(".__init__")
            if dep == "__init__" or dep == "":
                dep = "__init__"
            if _rank(dep) > mine and (name, dep) not in UPWARD_OK:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad


def test_only_the_os_layer_calls_the_os():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level and n.module}
        if not name.startswith("_os"):
            assert not mods & {"mmap", "fcntl", "posix_ipc"}, (name, mods & {"mmap", "fcntl", "posix_ipc"})


def test_the_payload_layers_use_only_the_declared_segment_interface():
    own = {n for n in vars(shmarray.Segment) if n.startswith("_") and not n.startswith("__")}
    used: dict[str, set[str]] = {}
    for name, path in _modules().items():
        if name == "_segment":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            receiver = ast.unparse(node.value)
            if receiver == "Segment" or receiver.endswith(("seg", "segment")):
                used.setdefault(node.attr, set()).add(name)
    assert set(used) <= _segment.PAYLOAD_INTERFACE, {k: v for k, v in used.items()
                                                    if k not in _segment.PAYLOAD_INTERFACE}
    assert _segment.PAYLOAD_INTERFACE - {"_dir"} <= own  # every declared name exists
