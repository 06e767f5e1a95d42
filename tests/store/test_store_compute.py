"""Compute once (Store.get_or_compute) and Store.memoize, in one process and across real ones."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest

import pstore
from pstore.store.compute import ComputeInTransactionError, arguments_digest, code_digest

from . import compute_workers

spawn = multiprocessing.get_context("spawn")


def run_workers(targets, meanwhile, results) -> list:
    """Start a process per (function, args), run meanwhile() here, and return every
    process's result (from the queue `results`) once all have ended."""
    processes = [spawn.Process(target=target, args=args) for target, args in targets]
    for process in processes:
        process.start()
    try:
        meanwhile()
        values = [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(60)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    return values


class Calls:
    """A compute function that counts its calls."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.count = 0

    def __call__(self) -> object:
        self.count += 1
        return self.result


def test_a_stored_value_is_returned_without_computing(store):
    store["k"] = [1, 2]
    compute = Calls("unused")
    assert store.get_or_compute("k", compute) == [1, 2]
    assert compute.count == 0


def test_a_missing_value_is_computed_once_stored_and_is_the_stored_object(opener):
    store = opener()
    value = {"a": [1, 2, 3]}
    compute = Calls(value)
    assert store.get_or_compute("k", compute) is value
    assert store.get_or_compute("k", compute) is value
    assert compute.count == 1
    store.close()
    assert opener("r")["k"] == {"a": [1, 2, 3]}


def test_an_exception_in_compute_stores_nothing(store):
    def fail() -> object:
        raise ZeroDivisionError("no data")

    with pytest.raises(ZeroDivisionError, match="no data"):
        store.get_or_compute("k", fail)
    assert "k" not in store
    assert store.get_or_compute("k", Calls(5)) == 5


def test_a_value_that_is_not_valid_is_computed_again_and_replaced(store):
    store["k"] = {"version": 1}
    compute = Calls({"version": 2})
    assert store.get_or_compute("k", compute, valid=lambda v: v["version"] == 2) == {"version": 2}
    assert store["k"] == {"version": 2}
    assert compute.count == 1


def test_read_only_and_in_transaction_refuse_to_compute_a_missing_key(opener):
    store = opener()
    store["there"] = 1
    with store.transaction():
        assert store.in_transaction
        assert store.get_or_compute("there", Calls(2)) == 1      # present: fine
        with pytest.raises(ComputeInTransactionError, match="'missing'.*inside a transaction"):
            store.get_or_compute("missing", Calls(2))
    assert not store.in_transaction
    store.close()
    reader = opener("r")
    with pytest.raises(pstore.ReadOnlyError, match="compute the missing key 'missing'"):
        reader.get_or_compute("missing", Calls(2))
    assert reader.get_or_compute("there", Calls(2)) == 1


@pytest.mark.slow
def test_four_processes_asking_at_once_compute_exactly_once(opener, path, backend_name, tmp_path):
    opener().close()
    log = str(tmp_path / "computes.log")
    start, results = spawn.Event(), spawn.Queue()
    values = run_workers([(compute_workers.compute_dataset,
                           (backend_name, path, log, start, 0.5, results))] * 4,
                         start.set, results)
    with open(log) as file:
        computers = file.read().split()
    assert len(computers) == 1
    assert all(value == values[0] for value in values)
    assert values[0]["by"] == int(computers[0])


@pytest.mark.slow
def test_an_exception_in_one_process_releases_the_others_to_compute(opener, path, backend_name):
    store = opener()
    started, results = spawn.Event(), spawn.Queue()

    def meanwhile() -> None:
        assert started.wait(30)
        # This process waits for the failing one's key lock, then computes itself.
        assert store.get_or_compute("dataset", Calls("mine")) == "mine"

    assert run_workers([(compute_workers.compute_then_fail,
                         (backend_name, path, started, 0.5, results))],
                       meanwhile, results) == ["the compute failed"]
    assert store["dataset"] == "mine"


@pytest.mark.slow
def test_other_keys_stay_writable_while_a_value_is_computed(opener, path, backend_name):
    store = opener(lock_timeout=5)
    started, release, results = spawn.Event(), spawn.Event(), spawn.Queue()

    def meanwhile() -> None:
        assert started.wait(30)
        store["other"] = 1          # would time out if the compute held the write lock
        with store.transaction():
            store["another"] = 2
        release.set()

    assert run_workers([(compute_workers.compute_until_released,
                         (backend_name, path, started, release, results))],
                       meanwhile, results) == ["slow value"]
    assert store["slow"] == "slow value"


# -- memoize -------------------------------------------------------------------------------

def test_memoize_computes_each_distinct_call_once(store):
    calls = []

    @store.memoize
    def square(x, scale=1):
        calls.append(x)
        return x * x * scale

    assert square(3) == 9
    assert square(3) == 9
    assert square(x=3) == 9             # the same call, bound to the same arguments
    assert square(3, scale=1) == 9      # the default, made explicit
    assert square(4) == 16
    assert calls == [3, 4]
    assert square.key(3) == square.key(x=3, scale=1) != square.key(4)
    assert square.__name__ == "square"


def test_memoize_forget_deletes_one_entry(store):
    calls = []

    @store.memoize
    def double(x):
        calls.append(x)
        return 2 * x

    double(1), double(2)
    assert double.forget(1)
    assert not double.forget(1)
    assert double(1) == 2 and double(2) == 4
    assert calls == [1, 2, 1]


def test_memoize_recomputes_when_the_function_body_changes(store):
    def version_one(x):
        return x + 1

    def version_two(x):
        return x + 2

    first = store.memoize(version_one, name="f")
    second = store.memoize(version_two, name="f")
    unchecked = store.memoize(version_two, name="f", check_code=False)
    assert first(1) == 2
    assert unchecked(1) == 2            # the stored result, whatever code computed it
    assert second(1) == 3               # another body: computed again, replacing it
    assert first(1) == 2
    assert first.key(1) == second.key(1)


@pytest.mark.parametrize("left, right", [
    (({"a": 1, "b": 2},), ({"b": 2, "a": 1},)),
    (({3, 1, 2},), ({2, 3, 1},)),
    (({"s": frozenset("xyz"), "t": [1, {"u": 2, "v": 3}]},),
     ({"t": [1, {"v": 3, "u": 2}], "s": frozenset("zyx")},)),
])
def test_equal_arguments_give_equal_digests(left, right):
    assert arguments_digest(left) == arguments_digest(right)


@pytest.mark.parametrize("left, right", [
    ((1,), (1.0,)),                     # equal, but not of the same type
    (({1},), (frozenset({1}),)),
    (({"a": 1},), ((("a", 1),),)),
    (([1, 2],), ((1, 2),)),
    (("dict",), ({},)),
])
def test_arguments_of_other_values_or_types_give_other_digests(left, right):
    assert arguments_digest(left) != arguments_digest(right)


def test_sharing_between_arguments_does_not_change_the_digest():
    part = [1, 2, 3]
    assert arguments_digest(([part, part],)) == arguments_digest(([[1, 2, 3], [1, 2, 3]],))


def test_unpicklable_arguments_raise_type_error_naming_the_problem():
    with pytest.raises(TypeError, match="cannot be pickled"):
        arguments_digest((lambda: 0,))


def test_code_digest_is_the_same_in_another_process_with_another_hash_seed(tmp_path):
    module = tmp_path / "memo_subject.py"
    module.write_text(textwrap.dedent("""
        def subject(x, option="a"):
            return x in {"alpha", "beta", "gamma", "delta"} or option in {"a", "b", "c"}
    """))
    program = ("import sys; sys.path.insert(0, sys.argv[1]); import memo_subject; "
               "from pstore.store.compute import code_digest; "
               "print(code_digest(memo_subject.subject))")
    digests = {subprocess.run([sys.executable, "-c", program, str(tmp_path)], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "3")}
    assert len(digests) == 1


def test_code_digest_differs_for_other_bodies_and_defaults():
    def one(x, y=1):
        return x + y

    def two(x, y=1):
        return x - y

    def three(x, y=2):
        return x + y

    assert len({code_digest(one), code_digest(two), code_digest(three)}) == 3
