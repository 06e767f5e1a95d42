"""The private attributes of the standard library's dbm modules that pstore's adapters
use (pstore/backends/dbm_modules.py), pinned on this Python: a Python that renames one
fails here, by name, not somewhere deep in a commit."""

from __future__ import annotations

import importlib

import pytest

from pstore.backends.dbm_modules import MODULES, SUFFIXES, choose_module, load_module


def test_dumb_has_the_attributes_its_adapter_uses(tmp_path):
    import dbm.dumb
    db = dbm.dumb.open(str(tmp_path / "d"), "c")
    try:
        assert isinstance(db, dbm.dumb._Database)
        assert isinstance(db._modified, bool)      # DumbModule.sync/abandon reset it
        assert isinstance(db._dirfile, bytes)      # the saved-index reader swaps it
        assert callable(db._update)                # ... and reads the index through it
        assert isinstance(db._index, dict)         # what len() counts, in memory
    finally:
        db.close()


def test_sqlite3_has_the_connection_its_adapter_uses(tmp_path):
    module = pytest.importorskip("dbm.sqlite3", reason="dbm.sqlite3 is new in Python 3.13")
    import sqlite3
    db = module.open(str(tmp_path / "d"), "c")
    try:
        assert isinstance(db._cx, sqlite3.Connection)  # SQLiteModule.write: one transaction
    finally:
        db.close()


def test_every_module_has_its_file_names_and_unknown_names_are_refused(tmp_path):
    assert set(SUFFIXES) == set(MODULES)
    with pytest.raises(ValueError, match="unknown dbm module"):
        choose_module(str(tmp_path / "x"), "c", "dbm.nosuch")


@pytest.mark.parametrize("name", MODULES)
def test_a_module_this_python_lacks_is_a_format_error(tmp_path, name):
    try:
        importlib.import_module(name)
    except ImportError:
        from pstore.errors import FormatError
        with pytest.raises(FormatError, match=name):
            load_module(name, str(tmp_path / "x"))
    else:
        assert load_module(name, str(tmp_path / "x")).name == name
