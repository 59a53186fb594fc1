"""The version of lfr_ext, in a module of its own so that any part of the package can read it
without importing the package root (``lfr_ext/__init__.py``) first."""

__version__ = "0.1.0"
