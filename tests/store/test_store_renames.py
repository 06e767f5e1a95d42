"""Class renames (issue 16 item 3): records written with one class name load through
``renames=`` under another; a class that is gone raises MissingClassError naming the key,
object id and module.name; iteration over values can skip or collect such records.

The classes live in real modules written to the test's folder and imported from there;
"renaming" one is deleting its module (file and sys.modules entry) and writing another.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pstore import Store
from pstore.errors import ArgumentError, Error, MissingClassError
from pstore.store.renames import Renames

POINT = """
import pstore

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return (type(other).__name__, vars(other)) == (type(self).__name__, vars(self))

class Holder:
    class Inner:
        pass

class Node(pstore.Persistent):
    def __init__(self, label):
        self.label = label
"""


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """write(name, source) puts module `name` in a folder on sys.path; remove(name) deletes
    it, so that importing it fails."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written: list[str] = []

    def write(name: str, source: str = POINT) -> None:
        target = folder.joinpath(*name.split(".")).with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        for package in target.relative_to(folder).parents:
            if package != Path("."):
                (folder / package / "__init__.py").touch()
        target.write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        written.append(name)

    def remove(name: str) -> None:
        """Delete module or package ``name``."""
        target = folder.joinpath(*name.split("."))
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.with_suffix(".py").unlink()
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
        importlib.invalidate_caches()

    yield write, remove
    for name in written:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]


def _fill(store, module_name: str) -> dict[str, int]:
    """Store a Point, a list holding a Point and a Persistent Node, and a plain value, under
    keys p, mixed, plain, node; the keys' object ids."""
    module = importlib.import_module(module_name)
    node = module.Node("n")
    with store.transaction():
        store["p"] = module.Point(1, 2)
        store["node"] = node
        store["mixed"] = [module.Point(3, 4), node]
        store["plain"] = {"just": "data"}
    return {key: store.raw_record(key)[0] for key in ("p", "node", "mixed", "plain")}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_renamed_class_loads_through_renames(opener, modules, protocol):
    write, remove = modules
    write("oldmodels")
    store = opener(protocol=protocol)
    _fill(store, "oldmodels")
    store.close()
    remove("oldmodels")
    write("newmodels", POINT.replace("class Point", "class Place")
          .replace("class Node", "class Vertex"))
    store = opener("r", renames={"oldmodels.Point": "newmodels.Place",
                                 "oldmodels.Node": "newmodels.Vertex"})
    new = importlib.import_module("newmodels")
    assert type(store["p"]) is new.Place and vars(store["p"]) == {"x": 1, "y": 2}
    first, node = store["mixed"]
    assert type(first) is new.Place and vars(first) == {"x": 3, "y": 4}
    # A Persistent reference's class is renamed too, and it is the object of key 'node'.
    assert type(node) is new.Vertex and node is store["node"] and node.label == "n"


def test_a_renamed_module_and_package_load_through_renames(opener, modules):
    write, remove = modules
    write("oldpkg.models")
    write("flatold")
    store = opener()
    store["deep"] = importlib.import_module("oldpkg.models").Point(5, 6)
    store["flat"] = importlib.import_module("flatold").Point(7, 8)
    store.close()
    remove("oldpkg")
    remove("flatold")
    write("newpkg.models")
    write("flatnew")
    store = opener("r", renames={"oldpkg": "newpkg", "flatold": "flatnew"})
    assert type(store["deep"]) is importlib.import_module("newpkg.models").Point
    assert type(store["flat"]) is importlib.import_module("flatnew").Point
    # What `pstore ls` prints names the classes as they load now.
    kinds = {key: info.kind for key, info in store.describe()}
    assert kinds == {"deep": "newpkg.models.Point", "flat": "flatnew.Point"}


def _moved(opener, modules, old: str, new: str, renames: dict[str, str]) -> Store:
    """A Store reading, with ``renames``, key "k" holding a Point of module ``old``, written
    before ``old`` was removed and module ``new`` written."""
    write, remove = modules
    write(old)
    store = opener()
    store["k"] = importlib.import_module(old).Point(1, 2)
    store.close()
    remove(old)
    write(new)
    return opener("r", renames=renames)


def test_a_nested_class_renamed_with_a_colon(opener, modules):
    store = _moved(opener, modules, "nestold", "nestnew", {"nestold.Point": "nestnew:Holder.Inner"})
    assert type(store["k"]) is importlib.import_module("nestnew").Holder.Inner


def test_a_removed_class_raises_missing_class_error_naming_key_object_id_and_name(
        opener, modules):
    write, remove = modules
    write("goneclass")
    store = opener()
    oids = _fill(store, "goneclass")
    store.close()
    write("goneclass", "class Other:\n    pass\n")      # the module stays, its classes go
    del sys.modules["goneclass"]
    store = opener("r")
    before = {key: store.raw_record(key) for key in oids}
    with pytest.raises(MissingClassError) as caught:
        store["p"]
    error = caught.value
    assert isinstance(error, Error) and isinstance(error, AttributeError)
    assert (error.key, error.object_id, error.global_name, error.renamed_to) == \
        ("p", oids["p"], "goneclass.Point", None)
    assert error.path == store.path
    assert "key 'p'" in str(error) and f"object id {oids['p']}" in str(error)
    assert "goneclass.Point" in str(error) and "renames=" in str(error)
    assert isinstance(error.__cause__, AttributeError)
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.args, str(again)) == (MissingClassError, error.args, str(error))
    # Nothing changed: the other keys load, every record is as it was.
    assert store["plain"] == {"just": "data"}
    assert {key: store.raw_record(key) for key in oids} == before


def test_a_missing_module_and_a_wrong_rename_name_what_was_tried(opener, modules):
    write, remove = modules
    write("gonemodule")
    store = opener()
    store["p"] = importlib.import_module("gonemodule").Point(1, 2)
    store.close()
    remove("gonemodule")
    with opener("r") as store:
        with pytest.raises(MissingClassError) as caught:
            store["p"]
    assert caught.value.global_name == "gonemodule.Point"
    assert isinstance(caught.value.__cause__, ImportError)
    with opener("r", renames={"gonemodule.Point": "nowhere.Point"}) as store:
        with pytest.raises(MissingClassError) as caught:
            store["p"]
    assert (caught.value.global_name, caught.value.renamed_to) == \
        ("gonemodule.Point", "nowhere.Point")
    assert "renamed to nowhere.Point" in str(caught.value)


def test_a_value_referring_to_a_record_of_a_removed_class_names_both(opener, modules):
    write, remove = modules
    write("gonenested")
    store = opener()
    point = importlib.import_module("gonenested").Point(1, 2)
    store["point"] = point
    store["outer"] = {"inside": point}
    inner_oid = store.raw_record("point")[0]
    store.close()
    remove("gonenested")
    store = opener("r")
    with pytest.raises(MissingClassError) as caught:
        store["outer"]
    # The key asked for, and the record that names the missing class.
    assert (caught.value.key, caught.value.object_id) == ("outer", inner_oid)


def test_iteration_skips_or_collects_records_whose_class_is_gone(opener, modules):
    write, remove = modules
    write("goneiter")
    store = opener()
    oids = _fill(store, "goneiter")
    store["more"] = [1, 2, 3]
    store.close()
    remove("goneiter")
    store = opener("r")
    with pytest.raises(MissingClassError):
        list(store.values())
    with pytest.raises(MissingClassError):
        dict(store.items(errors="raise"))
    assert sorted(map(str, store.values(errors="skip"))) == ["[1, 2, 3]", "{'just': 'data'}"]
    view = store.items(errors="collect")
    assert dict(view) == {"plain": {"just": "data"}, "more": [1, 2, 3]}
    found = {(error.key, error.object_id, error.global_name) for error in view.skipped}
    assert found == {("p", oids["p"], "goneiter.Point"),
                     ("node", oids["node"], "goneiter.Node"),
                     ("mixed", oids["mixed"], "goneiter.Point")}
    # A new iteration starts a new list.
    assert len(list(view)) == 2 and len(view.skipped) == 3
    values = store.values(errors="collect")
    assert len(list(values)) == 2 and {e.key for e in values.skipped} == {"p", "node", "mixed"}
    with pytest.raises(ArgumentError, match="errors"):
        store.values(errors="ignore")


def test_renames_travel_with_a_pickled_store(opener, modules):
    store = _moved(opener, modules, "travelold", "travelnew", {"travelold": "travelnew"})
    with pickle.loads(pickle.dumps(store)) as again:
        assert type(again["k"]) is importlib.import_module("travelnew").Point


@pytest.mark.parametrize("renames", [{"a b": "c"}, {"a": ""}, {"a.B": 3}, {1: "a"},
                                     [("a", "b")]])
def test_bad_renames_are_refused_before_the_store_is_opened(opener, renames):
    with pytest.raises(ArgumentError, match="renames"):
        opener(renames=renames)


_NAMES = st.lists(st.sampled_from(["a", "b", "pkg"]), min_size=1, max_size=3).map(".".join)


@given(renames=st.dictionaries(_NAMES, _NAMES, max_size=4), module=_NAMES,
       name=st.sampled_from(["a", "b", "X"]))
def test_renames_apply_the_whole_name_first_then_the_longest_package(renames, module, name):
    applied = Renames(renames).apply(module, name)
    new_global = renames.get(f"{module}.{name}", "")
    if "." in new_global:
        assert applied == tuple(new_global.rsplit(".", 1))
        return
    packages = [module.rsplit(".", cut)[0] for cut in range(module.count(".") + 1)]
    matching = [package for package in packages if package in renames]
    if not matching:
        assert applied == (module, name)
    else:
        longest = max(matching, key=len)
        assert applied == (renames[longest] + module[len(longest):], name)
