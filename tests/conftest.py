"""Plugins of the whole test suite: the session's PostgreSQL server (tests/pg.py), and the
session's signing key.

Every Store signs with a key (docs/safety.md): the session's is a temporary key file named
by ``PSTORE_KEY_FILE``, and ``XDG_DATA_HOME`` points into the same temporary folder, so
that no test (nor a process a test starts, which inherits both) touches the user's real
key folder.
"""

import atexit
import os
import shutil
import tempfile

pytest_plugins = ["tests.pg"]

_KEY_FOLDER = tempfile.mkdtemp(prefix="pstore-test-keys-")
atexit.register(shutil.rmtree, _KEY_FOLDER, ignore_errors=True)
_KEY_FILE = os.path.join(_KEY_FOLDER, "session.key")
with open(os.open(_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as _file:
    _file.write(os.urandom(32))
os.environ["PSTORE_KEY_FILE"] = _KEY_FILE
os.environ["XDG_DATA_HOME"] = os.path.join(_KEY_FOLDER, "data")
