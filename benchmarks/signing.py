"""What signing records costs: pstore with its records signed against the same Store
writing them unsigned, in one run (issue 13: no more than 10% on small sets and bulk).

    python3 benchmarks/signing.py              # 7 alternating rounds
    python3 benchmarks/signing.py --rounds 3

It prints, per workload, the medians of signed and unsigned rounds (run one after the
other in each round, in one process) and their ratio (signed / unsigned: 1 means free),
then the cost of packing and unpacking one small record's envelope with and without a
signer (best of 5 timeit runs). "Unsigned" is the Store with no signer: its records carry
a digest and no MAC, as another user's records look to it. It asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pickle  # noqa: E402 (after the path)

import pstore  # noqa: E402
from pstore.store import records  # noqa: E402
from pstore.store.signing import Signer  # noqa: E402

VALUE = {"name": "x" * 20, "n": 12345, "xs": [1.5, 2.5, 3.5]}


def one_round(signed: bool, singles: int, bulk: int) -> dict[str, float]:
    """Rates (per second) of ``singles`` sets with a commit each, then ``bulk`` sets in one
    transaction, into a new SQLite store."""
    folder = tempfile.mkdtemp(prefix="bench-signing-")
    try:
        with pstore.open(os.path.join(folder, "s.db")) as store:
            if not signed:
                store._txn._signer = None   # the transaction packs records without a MAC
            start = time.perf_counter()
            for number in range(singles):
                store[f"k{number}"] = VALUE
            single_rate = singles / (time.perf_counter() - start)
            start = time.perf_counter()
            with store.transaction():
                for number in range(bulk):
                    store[f"b{number}"] = VALUE
            bulk_rate = bulk / (time.perf_counter() - start)
        return {"single sets": single_rate, "bulk sets": bulk_rate}
    finally:
        shutil.rmtree(folder)


def envelope_costs() -> dict[str, float]:
    """Nanoseconds to pack and to unpack one small record, signed and unsigned."""
    payload = pickle.dumps(VALUE, 5)
    signer = Signer(b"k" * 32)
    signed, unsigned = (records.pack(7, payload, [], 0, signer),
                        records.pack(7, payload, [], 0))
    cases = {
        "pack, signed": lambda: records.pack(7, payload, [], 0, signer),
        "pack, unsigned": lambda: records.pack(7, payload, [], 0),
        "unpack, signed (MAC checked)": lambda: records.unpack(signed, 7, signer=signer),
        "unpack, unsigned (digest checked)": lambda: records.unpack(unsigned, 7),
    }
    number = 100_000
    return {name: min(timeit.repeat(case, number=number, repeat=5)) / number * 1e9
            for name, case in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--singles", type=int, default=1500)
    parser.add_argument("--bulk", type=int, default=20_000)
    args = parser.parse_args()
    rounds: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for signed in (True, False):
            rounds[signed].append(one_round(signed, args.singles, args.bulk))
    print(f"pstore from {Path(pstore.__file__).parent}; SQLite; medians of {args.rounds} rounds")
    print(f"{'workload':<14} {'signed':>10} {'unsigned':>10} {'signed / unsigned':>18}")
    for workload in ("single sets", "bulk sets"):
        signed_rate = statistics.median(result[workload] for result in rounds[True])
        unsigned_rate = statistics.median(result[workload] for result in rounds[False])
        print(f"{workload:<14} {signed_rate:>8.0f}/s {unsigned_rate:>8.0f}/s "
              f"{signed_rate / unsigned_rate:>18.3f}")
    print("one small record's envelope (best of 5):")
    for name, nanoseconds in envelope_costs().items():
        print(f"  {name:<36} {nanoseconds:>7.0f} ns")


if __name__ == "__main__":
    main()
