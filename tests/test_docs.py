"""Every python block of the documentation (docs/**/*.md) runs as written, and ends.

The same machinery as the README's (tests/_codeblocks.py): each block in a
private /dev/shm, a block cut at ``# in any other process`` running as
separate processes.
"""

from __future__ import annotations

import glob
import os

import pytest
from _codeblocks import blocks, parts, run_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(p for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)
               if os.sep + "_build" + os.sep not in p)
_BLOCKS = [(os.path.relpath(p, ROOT), line, src) for p in PAGES for line, src in blocks(p)]


@pytest.mark.parametrize("page,line,src", _BLOCKS, ids=[f"{p} line {n}" for p, n, _ in _BLOCKS])
def test_docs_block_runs(page, line, src, tmp_path):
    run_block(src, tmp_path, f"{page} line {line}")


def test_the_docs_have_blocks():
    assert len(PAGES) >= 20
    assert len(_BLOCKS) >= 15
    assert all(parts(src) for _, _, src in _BLOCKS)


# The Examples sections of the public docstrings (what the API pages show), run as
# doctests in one process with a private /dev/shm, as the pages' blocks are.
_DOCTESTS = r'''
import doctest, gc, importlib, sys
import shmarray

modules = [shmarray, importlib.import_module("shmarray.qt")]
try:
    modules.append(importlib.import_module("shmarray.dask"))
except ImportError:
    pass
finder = doctest.DocTestFinder(exclude_empty=True)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
seen = set()
for mod in modules:
    for name in mod.__all__:
        obj = getattr(mod, name)
        if id(obj) in seen or isinstance(obj, (str, int)):
            continue
        seen.add(id(obj))
        for test in finder.find(obj, f"{mod.__name__}.{name}", module=False, globs={}):
            runner.run(test)
            gc.collect()
failed, attempted = runner.summarize(verbose=False)
print(f"{attempted} docstring examples, {failed} failed")
if failed or attempted < 10:
    sys.exit(1)
'''


def test_docstring_examples_run(tmp_path):
    run_block(_DOCTESTS, tmp_path, "the public docstrings' Examples sections")
