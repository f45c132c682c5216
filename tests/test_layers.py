"""The layout holds: each layer imports only the layers below it, and the layers above the segment
core use of a Segment only its public API and the service it declares (``_segment.SegmentService``)."""

from __future__ import annotations

import ast
import pathlib

import shmarray

PKG = pathlib.Path(shmarray.__file__).parent

# Bottom to top; a module may import (at module level or inside a function) only modules of its own
# rank or below. Leaves that import nothing of shmarray may be used by any layer.
RANKS = [
    {"_errors", "_display", "_progress", "_wait"},
    {"_os", "_os._linux", "_os._names", "_os._qtipc", "_cuda"},
    {"_control", "_reuse", "_reuse.idle_maps", "_watch"},
    {"_lock"},
    {"_attachment", "_reuse.kept_files", "_reuse.allocator"},
    {"_transfer", "_reference", "_reaper"},
    {"_lifecycle"},
    {"_segment"},
    {"_header", "_npy"},
    {"_array", "_arrow", "_samples", "_ring", "_ring.layout", "_ring.slots", "_ring.ring", "_torch"},
    {"_admin", "_doctor", "_daskhook",
     "qt._keys", "qt._backend", "qt._semaphore", "qt._native", "qt._segment_backend"},
    {"_inspect", "qt", "qt._facade", "qt._arrays", "dask"},
    {"_demo"},
    {"_cli", "__main__", "__init__"},
]
# The one sanctioned upward reference: the CLI runs the demo (only the CLI imports it).
UPWARD_OK = {("_cli", "_demo")}


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


def _class_body(path: pathlib.Path, name: str) -> ast.ClassDef:
    return next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name)


def _declared_service() -> set[str]:
    """The members SegmentService declares: read from its class body, the one declaration."""
    names = set()
    for node in _class_body(PKG / "_segment.py", "SegmentService").body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _privates_of(cls: ast.ClassDef) -> set[str]:
    """The private members a class defines: in its body, in __slots__, or assigned to self (or seg) in it."""
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    names |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__"
                                                  for t in node.targets):
            names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)
                      and isinstance(c.value, str)}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _segment_privates() -> set[str]:
    """The private members only Segment has: a name another class of the package also defines
    (``TableHandle._key``) says nothing about whose member a use is."""
    mine = _privates_of(_class_body(PKG / "_segment.py", "Segment"))
    others: set[str] = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not (name == "_segment" and node.name in ("Segment",
                                                                                          "SegmentService")):
                others |= _privates_of(node)
    return mine - others


def test_the_layers_above_use_only_the_declared_segment_service():
    declared = _declared_service()
    privates = _segment_privates()
    defined = _privates_of(_class_body(PKG / "_segment.py", "Segment"))
    assert declared <= defined, declared - defined  # every declared member exists on Segment
    assert "_att" in privates and "_arm" in privates  # the reading works
    top = _rank("_segment")
    bad = []
    for name, path in _modules().items():
        if _rank(name.removesuffix(".__init__")) <= top:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # Any receiver but the module's own objects (self, cls): a Segment's private reached from
            # above must be one the service declares, whatever the variable is called.
            if (isinstance(node, ast.Attribute) and node.attr in privates - declared
                    and ast.unparse(node.value) not in ("self", "cls")):
                bad.append(f"{name}: {ast.unparse(node)}")
    assert not bad, bad


def test_the_service_declares_what_segment_implements():
    import inspect

    for member in _declared_service():
        ours = getattr(shmarray.Segment, member, None)
        if member == "_dir":
            continue  # an attribute, set per object
        assert callable(ours), member
        declared = getattr(shmarray._segment.SegmentService, member)
        assert list(inspect.signature(declared).parameters)[1:] == list(inspect.signature(ours).parameters)[
            (0 if isinstance(inspect.getattr_static(shmarray.Segment, member), classmethod) else 1):], member
