"""A hypothesis state machine: the Store behaves like a dict, through transactions and reopening."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import pstore

keys = st.text(max_size=4)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                max_size=3),
    max_leaves=6)
operations = st.lists(st.tuples(st.sampled_from(["set", "del", "alias"]), keys, keys, values),
                      max_size=5)


class Boom(Exception):
    pass


class StoreModel(RuleBasedStateMachine):
    backend = "sqlite"
    location: str | None = None     # a server store's URL, emptied by flag 'n' each example

    @initialize()
    def open_store(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.path = self.location or os.path.join(self.directory, "model.db")
        self.store = pstore.open(self.path, "n", backend=self.backend)
        self.model: dict[str, object] = {}

    def apply(self, operation: str, key: str, other: str, value: object) -> None:
        """Do one operation on the store and the model alike."""
        if operation == "set":
            self.store[key] = value
            self.model[key] = value
        elif operation == "del":
            if key in self.model:
                del self.store[key]
                del self.model[key]
        elif other in self.model:      # alias: the same object under a second key
            self.store[key] = self.store[other]
            self.model[key] = self.model[other]

    @rule(operation=st.sampled_from(["set", "del", "alias"]), key=keys, other=keys,
          value=values)
    def single(self, operation: str, key: str, other: str, value: object) -> None:
        self.apply(operation, key, other, value)

    @rule(steps=operations, fail=st.booleans())
    def transaction(self, steps: list, fail: bool) -> None:
        before = dict(self.model)
        try:
            with self.store.transaction():
                for step in steps:
                    self.apply(*step)
                if fail:
                    raise Boom
        except Boom:
            self.model = before

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = pstore.open(self.path, "w", backend=self.backend)

    @rule()
    def collect(self) -> None:
        self.store.gc()

    @invariant()
    def same_as_the_model(self) -> None:
        if hasattr(self, "store"):
            assert len(self.store) == len(self.model)
            assert dict(self.store.items()) == self.model

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.directory)


@pytest.mark.slow
def test_store_behaves_like_a_dict(backend_name, path):
    location = path if backend_name == "postgresql" else None
    machine = type(f"StoreModel_{backend_name}", (StoreModel,),
                   {"backend": backend_name, "location": location})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, deadline=None,
                                                         stateful_step_count=25))
