"""Build configuration beyond pyproject.toml: the unpickler's optional C fast path.

``optional=True``: where no C compiler is at hand, pstore installs without it and
the pure-Python unpickler does all the work (same results, slower on small records).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pstore.engine._speedups", ["pstore/engine/_speedups.c"],
                             optional=True)])
