"""Time pstore.engine's dumps and loads against the stdlib's pickle, in one run.

    python3 benchmarks/engine.py [--protocol 5] [--repeat 5] [--quick]

Three values are pickled and unpickled by three implementations: pstore.engine,
the stdlib's pure-Python ``pickle._Pickler``/``pickle._Unpickler`` (through a
BytesIO, as ``pickle.dumps`` would if ``_pickle`` were missing) and the stdlib's
C ``pickle.dumps``/``pickle.loads``. Each time is the best of ``--repeat`` runs,
with the garbage collector off while timing. The table gives the times, pstore's
and C's throughput (MB of pickle per second), how many times faster pstore is
than the pure-Python pickle (target: at least 2x) and pstore's throughput as a
fraction of C's (targets: dumps at least 0.6x, loads at least 0.9x). The first
line says whether pstore's C fast paths are on (``PSTORE_PURE_PYTHON=1`` turns
them off). ``--quick`` uses a small corpus, for a smoke run. The benchmark
prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import io
import pickle
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pstore import engine  # noqa: E402  (needs the repository on sys.path)
from pstore.engine import pickler, unpickler  # noqa: E402

#: pstore must be at least this many times faster than the stdlib's pure-Python pickle.
TARGET_SPEEDUP = 2.0
#: pstore's throughput as a fraction of the C pickle's must be at least this, by operation.
TARGET_OF_C = {"dumps": 0.6, "loads": 0.9}


# -- the corpus -------------------------------------------------------------------------------

def build_nested(groups: int) -> dict[str, Any]:
    """A tree of dicts and lists with str, int, float and tuple leaves: ~16 objects per group."""
    tree: dict[str, Any] = {}
    for i in range(groups):
        branch = tree.setdefault(f"branch{i % 100}", {})
        branch[f"item{i}"] = [i, i / 7, f"text {i}", (i, f"t{i}", -1.5 * i),
                              {"id": i, "name": f"n{i}", "tags": ["a", "b", str(i)]}]
    return tree


def build_records(count: int) -> list[dict[str, Any]]:
    """``count`` small records: dicts of str, int and float fields."""
    return [{"id": i, "name": f"user{i}", "email": f"user{i}@example.com", "age": 20 + i % 50,
             "score": i * 0.25, "city": ("Oslo", "Lima", "Pune")[i % 3]}
            for i in range(count)]


def build_payload(size: int) -> dict[str, Any]:
    """One object holding a ``size``-byte bytes payload."""
    return {"name": "blob", "payload": bytes(range(256)) * (size // 256), "shape": (size,)}


def build_corpus(quick: bool = False) -> dict[str, Any]:
    """The values the benchmark pickles, by name; ``quick`` makes them about 50 times smaller."""
    if quick:
        return {"nested": build_nested(120), "records": build_records(2_000),
                "payload": build_payload(2 * 2**20)}
    return {"nested": build_nested(6_250), "records": build_records(100_000),
            "payload": build_payload(100 * 2**20)}


def count_objects(value: Any) -> int:
    """How many objects a value is made of, counting every container and leaf once per path."""
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


# -- the implementations ----------------------------------------------------------------------

def _pure_dumps(obj: Any, protocol: int) -> bytes:
    stream = io.BytesIO()
    pickle._Pickler(stream, protocol).dump(obj)  # type: ignore[attr-defined]
    return stream.getvalue()


def _pure_loads(data: bytes) -> Any:
    return pickle._Unpickler(io.BytesIO(data)).load()  # type: ignore[attr-defined]


class Implementation(NamedTuple):
    """A pickle implementation under test: its name in the table, its dumps and loads."""

    name: str
    dumps: Callable[[Any, int], bytes]
    loads: Callable[[bytes], Any]


IMPLEMENTATIONS = (
    Implementation("pstore", engine.dumps, engine.loads),
    Implementation("pure-python", _pure_dumps, _pure_loads),
    Implementation("C", pickle.dumps, pickle.loads),
)


# -- timing -----------------------------------------------------------------------------------

def best_time(func: Callable[[], Any], repeat: int) -> float:
    """The shortest of ``repeat`` timings of ``func()``, in seconds, with gc off while timing."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            func()
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


class Row(NamedTuple):
    """The times of one operation on one value, by implementation name."""

    value: str
    operation: str        #: "dumps" or "loads"
    seconds: dict[str, float]
    size: int             #: bytes of the pickle (the same for every implementation)

    @property
    def speedup(self) -> float:
        """How many times faster pstore is than the pure-Python pickle."""
        return self.seconds["pure-python"] / self.seconds["pstore"]

    @property
    def of_c(self) -> float:
        """pstore's throughput as a fraction of the C pickle's (C time / pstore time)."""
        return self.seconds["C"] / self.seconds["pstore"]

    def throughput(self, name: str) -> float:
        """MB of pickle per second for the implementation ``name``."""
        return self.size / self.seconds[name] / 1e6

    @property
    def met(self) -> bool:
        return self.speedup >= TARGET_SPEEDUP and self.of_c >= TARGET_OF_C[self.operation]


def measure(corpus: dict[str, Any], protocol: int, repeat: int) -> list[Row]:
    """Time dumps and loads of every value of ``corpus`` with every implementation.

    Each implementation loads the pickle it wrote itself.
    """
    rows = []
    for name, value in corpus.items():
        dump_times: dict[str, float] = {}
        load_times: dict[str, float] = {}
        size = 0
        for impl in IMPLEMENTATIONS:
            data = impl.dumps(value, protocol)
            size = len(data)
            dump_times[impl.name] = best_time(partial(impl.dumps, value, protocol), repeat)
            load_times[impl.name] = best_time(partial(impl.loads, data), repeat)
            del data  # a 100 MB pickle need not outlive its timing
        rows += [Row(name, "dumps", dump_times, size), Row(name, "loads", load_times, size)]
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a text table, and a last line saying whether every row meets its targets."""
    names = [impl.name for impl in IMPLEMENTATIONS]
    header = (f"{'value':<8} {'op':<6}" + "".join(f"{name:>13}" for name in names)
              + f"{'pstore MB/s':>13}{'C MB/s':>9}{'vs pure-py':>12}{'of C':>7}  target")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.value:<8} {row.operation:<6}"
                     + "".join(f"{row.seconds[name] * 1000:>11.1f}ms" for name in names)
                     + f"{row.throughput('pstore'):>13.0f}{row.throughput('C'):>9.0f}"
                     + f"{row.speedup:>11.2f}x{row.of_c:>6.2f}x  "
                     + ("met" if row.met else "NOT met"))
    missed = sum(not row.met for row in rows)
    verdict = "met by every row" if not missed else f"NOT met by {missed} of {len(rows)} rows"
    lines.append(f"target: pstore >= {TARGET_SPEEDUP:g}x faster than pure-Python pickle, "
                 f"and >= {TARGET_OF_C['dumps']:g}x (dumps) / {TARGET_OF_C['loads']:g}x "
                 f"(loads) of C pickle's throughput: {verdict}")
    lines.append("'vs pure-py' is pure-Python time / pstore time; 'of C' is C time / pstore "
                 "time, i.e. pstore's throughput / C's (higher is better for both).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; the exit status is 0 whatever the times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=int, default=5, choices=range(6),
                        help="pickle protocol (default: 5)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timings per measurement; the best is kept (default: 5)")
    parser.add_argument("--quick", action="store_true", help="a small corpus, for a smoke run")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    corpus = build_corpus(args.quick)
    sizes = ", ".join(f"{name} {count_objects(value):,} objects" for name, value in corpus.items())
    def mode(accelerator: Any) -> str:
        return "pure Python" if accelerator is None else "C fast path"

    print(f"Python {sys.version.split()[0]}, protocol {args.protocol}, best of {args.repeat}; "
          f"{sizes}; pstore's pickler: {mode(pickler._accelerator)}, unpickler: "
          f"{mode(unpickler._accelerate)} (PSTORE_PURE_PYTHON=1: pure Python)")
    print(format_table(measure(corpus, args.protocol, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
