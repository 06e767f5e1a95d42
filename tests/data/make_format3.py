"""Writes tests/data/format3/: stores of format version 3 (BLAKE2b blob names), made by
the pstore of that version (git 2427664): ``git archive 2427664 pstore | tar -x -C OLD;
PYTHONPATH=OLD python3 tests/data/make_format3.py``. tests/store/test_store_blob_names.py
reads them."""

import os

import pstore
from pstore.engine import PickleBuffer

#: The bytes of the blob each store holds (tests/store/test_store_blob_names.py knows them).
BLOB = bytes(range(256)) * 16

if __name__ == "__main__":
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "format3")
    for name, options in [("store.sqlite", {}), ("store.dumb", {"backend": "dbm:dbm.dumb"})]:
        with pstore.open(os.path.join(folder, name), "n", blob_threshold=1024, **options) as s:
            s["array"] = PickleBuffer(bytearray(BLOB))
            s["list"] = [1, "two", 3.0]
