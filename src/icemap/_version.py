"""icemap's version: a leaf module, so that any module may read it without importing the package face.

The one home of the number: ``pyproject.toml`` reads it from here (setuptools' ``attr:``), and
``icemap.__version__`` re-exports it.
"""

__version__ = "0.1.0"
