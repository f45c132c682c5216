"""Every python block of the README runs as written, and ends (see tests/_codeblocks.py)."""

from __future__ import annotations

import os

import pytest
from _codeblocks import blocks, parts, run_block

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCKS = blocks(README)


@pytest.mark.parametrize("line,src", _BLOCKS, ids=[f"README line {n}" for n, _ in _BLOCKS])
def test_readme_block_runs(line, src, tmp_path):
    run_block(src, tmp_path, f"README line {line}")


def test_the_readme_has_blocks():
    assert len(blocks(README)) >= 3
    assert all(parts(src) for _, src in blocks(README))
