"""Sphinx configuration of the etcdcron docs (``make docs`` builds them, warnings as errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import etcdcron  # noqa: E402

project = "etcdcron"
author = "the etcdcron authors"
copyright = "the etcdcron authors"
release = etcdcron.__version__
version = release

extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"undoc-members": False}
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
