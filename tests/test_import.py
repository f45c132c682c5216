"""What `import shmarray` loads: a worker that only attaches arrays should not pay for Arrow,
the batch ring, torch, the listing or ctypes.util; the lazily loaded names still resolve."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import shmarray

_PROBE = r"""
import json, sys
import {what}
print(json.dumps(sorted(m for m in sys.modules
                        if m.startswith(("shmarray.", "pyarrow", "pandas", "torch", "ctypes.util", "secrets")))))
"""


def test_import_loads_only_the_array_path():
    def loads(what: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", _PROBE.format(what=what)], capture_output=True, text=True,
                             timeout=60, check=True)
        return set(json.loads(out.stdout))

    loaded = loads("shmarray")
    numpys = loads("numpy")  # NumPy 1.x loads secrets itself: not ours to save
    for heavy in ("shmarray._arrow", "shmarray._ring", "shmarray._torch", "shmarray._inspect",
                  "pyarrow", "pandas", "torch", "ctypes.util", "secrets"):
        assert heavy not in loaded - numpys, f"import shmarray loaded {heavy}"
    assert {"shmarray._array", "shmarray._segment"} <= loaded


def test_lazy_names_resolve_and_are_listed():
    for name in shmarray.__all__:
        assert getattr(shmarray, name) is not None
    assert shmarray.BatchRing.__module__ == "shmarray"
    from shmarray import _arrow

    assert shmarray.share_table is _arrow.share_table
    assert set(shmarray.__all__) <= set(dir(shmarray))
    with pytest.raises(AttributeError, match="no_such_name"):
        shmarray.no_such_name  # noqa: B018
