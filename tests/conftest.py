"""Plugins of the whole test suite: the session's PostgreSQL server (tests/pg.py), the
session's signing key, and hypothesis without per-example deadlines.

Every Store signs with a key (docs/safety.md): the session's is a temporary key file named
by ``PSTORE_KEY_FILE``, and ``XDG_DATA_HOME`` points into the same temporary folder, so
that no test (nor a process a test starts, which inherits both) touches the user's real
key folder.
"""

import atexit
import os
import shutil
import tempfile

from hypothesis import settings

pytest_plugins = ["tests.pg"]

# No test here times itself: an example slowed by a busy machine (CI shares two cores)
# is not a failure.
settings.register_profile("pstore", deadline=None)
settings.load_profile("pstore")

_KEY_FOLDER = tempfile.mkdtemp(prefix="pstore-test-keys-")
atexit.register(shutil.rmtree, _KEY_FOLDER, ignore_errors=True)
_KEY_FILE = os.path.join(_KEY_FOLDER, "session.key")
with open(os.open(_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as _file:
    _file.write(os.urandom(32))
os.environ["PSTORE_KEY_FILE"] = _KEY_FILE
os.environ["XDG_DATA_HOME"] = os.path.join(_KEY_FOLDER, "data")
