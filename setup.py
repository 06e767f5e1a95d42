"""Build configuration beyond pyproject.toml: the engine's optional C fast paths.

``optional=True``: where no C compiler is at hand, pstore installs without them and the
pure-Python pickler and unpickler do all the work (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("pstore.engine._speedups", ["pstore/engine/_speedups.c"], optional=True),
    Extension("pstore.engine._pickler_speedups", ["pstore/engine/_pickler_speedups.c"],
              optional=True),
])
