"""Sphinx configuration for shmarray's documentation.

Built offline (no intersphinx, no notebook execution): ``python -m sphinx -W
-b html docs docs/_build/html``. The code blocks of these pages are run by
``tests/test_docs.py``, not by Sphinx.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

project = "shmarray"
author = "shmarray developers"
copyright = "shmarray developers"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_design",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# numpydoc-style docstrings, read by napoleon (no network, no extra package).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# numpydoc sections carry the types; hints fill in only what a docstring documents.
autodoc_typehints_description_target = "documented"
# Defaults as written (dtype=float, not <class 'float'>).
autodoc_preserve_defaults = True
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False}
# The page ToC names members without their class ("acquire()", not "BatchRing.acquire()").
toc_object_entries_show_parents = "hide"
autodoc_inherit_docstrings = False
# Optional dependencies the API pages import; mocked only where they are not
# installed, so that `pip install -e '.[docs]'` alone builds the reference.
autodoc_mock_imports = [m for m in ("distributed", "dask", "torch")
                        if importlib.util.find_spec(m) is None]
# Type hints name classes from optional packages (pyarrow, pandas, torch):
# nitpicky stays off, so an unresolved annotation is plain text, not a warning.
nitpicky = False

html_theme = "pydata_sphinx_theme"
html_title = "shmarray"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "footer_start": ["copyright"],
    "footer_end": [],
    "secondary_sidebar_items": ["page-toc"],
}
# Pages without sub-pages need no section navigation.
html_sidebars = {"index": [], "getting-started": [], "formats": [], "contributing": []}
pygments_style = "sphinx"
