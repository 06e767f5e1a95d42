"""Build configuration beyond pyproject.toml: the optional C fast paths (the engine's, and BLAKE2b's).

``optional=True``: where no C compiler is at hand, pstore installs without them and the
pure-Python pickler and unpickler do all the work (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("pstore.engine._speedups", ["pstore/engine/_speedups.c"], optional=True),
    Extension("pstore.engine._pickler_speedups", ["pstore/engine/_pickler_speedups.c"],
              optional=True),
    # One-shot BLAKE2b for the per-record digest, MAC and binding seal (see pstore/_blake2.py).
    Extension("pstore._blake2_speedups", ["pstore/_blake2_speedups.c"], optional=True),
])
