"""Cold start: ``import pstore`` and the first ``open`` import only what they need, in a
fresh interpreter (``-S``: the site packages of the machine import nothing of their own)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Imported at first use only, never by ``import pstore``.
NOT_AT_IMPORT = {
    "sqlite3", "hashlib", "_hashlib", "dataclasses", "inspect", "lzma", "json", "socket",
    "secrets", "filelock", "numpy", "pandas", "torch", "pstore.migrate", "pstore.backends.sqlite",
    "pstore.backends.dbm", "pstore.backends.files", "pstore.engine.tools",
    "pstore.engine.restricted", "pstore.store.compute", "pstore.store.inspection",
}
#: Not even by the first open, and get, of an existing SQLite store.
NOT_AT_FIRST_READ = {
    "pstore.backends.dbm", "pstore.backends.dbm_modules", "pstore.backends.journal",
    "filelock", "socket", "secrets", "hashlib", "dataclasses", "inspect", "lzma", "json",
    "pstore.migrate", "numpy", "torch",
}


def modules_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-S", "-c", f"{code}\nimport sys\n"
                          "print(' '.join(sys.modules))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_pstore_imports_only_the_engine_and_the_store():
    loaded = modules_after("import pstore")
    assert "pstore.store.store" in loaded and "pstore.engine.pickler" in loaded
    assert loaded & NOT_AT_IMPORT == set()


def test_the_first_read_of_an_sqlite_store_imports_neither_dbm_nor_the_lock_library(tmp_path):
    path = str(tmp_path / "s.db")
    subprocess.run([sys.executable, "-c", f"import pstore\nwith pstore.open({path!r}) as s: "
                    "s['k'] = {'a': 1}"], env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    loaded = modules_after(f"import pstore\nwith pstore.open({path!r}, 'r') as s:\n"
                           "    assert s['k'] == {'a': 1}")
    assert "pstore.backends.sqlite" in loaded
    assert loaded & NOT_AT_FIRST_READ == set()


@pytest.mark.parametrize("name, module", [
    ("pstore.copy", "pstore.migrate"), ("pstore.convert", "pstore.migrate"),
    ("pstore.engine.disassemble", "pstore.engine.tools"),
    ("pstore.engine.RestrictedUnpickler", "pstore.engine.restricted"),
])
def test_lazy_public_names_import_their_module_at_first_use(name, module):
    owner, _, attribute = name.rpartition(".")
    loaded = modules_after(f"import {owner}\nvalue = {name}\n"
                           f"assert value is getattr(__import__({module!r}, fromlist=['x']), "
                           f"{attribute!r})\nassert {attribute!r} in dir({owner})")
    assert module in loaded


def test_an_unknown_attribute_is_still_an_attribute_error():
    import pstore
    import pstore.engine
    with pytest.raises(AttributeError, match="no_such_name"):
        pstore.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="no_such_name"):
        pstore.engine.no_such_name  # noqa: B018
