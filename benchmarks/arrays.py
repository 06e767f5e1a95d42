"""A ~1 GB ML dataset stored and loaded by pstore and by its peers, in one run.

    python3 benchmarks/arrays.py               # 1024 MB
    python3 benchmarks/arrays.py --size-mb 64  # a smaller dataset
    python3 benchmarks/arrays.py --peers pstore,np.save   # some of them
    python3 benchmarks/arrays.py --repeat 5    # medians of five rounds (default three)

The dataset is what a training script caches: ``{"train", "valid", "test"}``, each
``{"features": float32 (rows, 256), "labels": int64 (rows,)}``, split 80/10/10.
Each library writes it and loads it in processes of its own, so that peak RSS
(VmHWM, reset before the measured step) belongs to that step alone:

* **write**: MB/s of storing the three splits, and the same with the written
  files fsynced afterwards (pstore always fsyncs its blobs before it commits, so
  "write+fsync" is the equal-durability comparison); peak RSS while writing, and
  the dataset's size for comparison.
* **first element**: seconds from opening to ``train["features"][0, 0]`` in a
  fresh process; **full read**: MB/s of then touching every element (a sum).

Peers: pickle (one file, protocol 5), np.save/np.load(mmap_mode='r') (one .npy
per array), joblib.dump/load(mmap_mode='r'), diskcache and sqlitedict (a key per
split). The same dataset as torch tensors (``torch.from_numpy``, no copy) is stored
by pstore ("pstore-torch": one blob per tensor, loaded mapped), by
torch.save/torch.load(mmap=True) and by safetensors' save_file/load_file (keys
``split/name``). Missing peers (``pip install pstore[bench]``, torch, safetensors)
are skipped. The targets compare pstore's write+fsync throughput with np.save's
(pstore's blob names are BLAKE3 digests, computed as the bytes are written). The files
stay in the page cache between write and load (no cache drop: it needs root),
so loads that read are measured at memory speed, their best case.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

COLUMNS = 256
SPLITS = {"train": 0.8, "valid": 0.1, "test": 0.1}


def make_dataset(size_mb: int) -> dict[str, dict[str, np.ndarray]]:
    rows = size_mb * 1024 * 1024 // (COLUMNS * 4 + 8)
    rng = np.random.default_rng(0)
    dataset = {}
    for split, share in SPLITS.items():
        n = int(rows * share)
        dataset[split] = {"features": rng.standard_normal((n, COLUMNS), dtype=np.float32),
                          "labels": rng.integers(0, 1000, n, dtype=np.int64)}
    return dataset


def nbytes(dataset: dict[str, dict[str, np.ndarray]]) -> int:
    return sum(array.nbytes for split in dataset.values() for array in split.values())


# -- each library: write(directory, dataset) and load(directory) -> {split: {name: array}} ---

def pstore_write(directory: str, dataset: dict) -> None:
    import pstore
    with pstore.open(os.path.join(directory, "data.db")) as store:
        with store.transaction():
            for split, arrays in dataset.items():
                store[split] = arrays


def pstore_load(directory: str) -> Any:
    import pstore
    return pstore.open(os.path.join(directory, "data.db"), "r")


def pstore_torch_write(directory: str, dataset: dict) -> None:
    import torch  # noqa: F401  (pstore recognises tensors when torch is imported)
    pstore_write(directory, dataset)


def pstore_torch_load(directory: str) -> Any:
    import torch  # noqa: F401
    return pstore_load(directory)


def torch_write(directory: str, dataset: dict) -> None:
    import torch
    torch.save(dataset, os.path.join(directory, "data.pt"))


def torch_load(directory: str) -> Any:
    import torch
    return torch.load(os.path.join(directory, "data.pt"), mmap=True, weights_only=True)


def safetensors_write(directory: str, dataset: dict) -> None:
    from safetensors.torch import save_file
    save_file({f"{split}/{name}": tensor for split, tensors in dataset.items()
               for name, tensor in tensors.items()}, os.path.join(directory, "data.safetensors"))


def safetensors_load(directory: str) -> Any:
    from safetensors.torch import load_file
    flat = load_file(os.path.join(directory, "data.safetensors"))
    return {split: {name: flat[f"{split}/{name}"] for name in ("features", "labels")}
            for split in SPLITS}


def pickle_write(directory: str, dataset: dict) -> None:
    with open(os.path.join(directory, "data.pkl"), "wb") as file:
        pickle.dump(dataset, file, protocol=5)


def pickle_load(directory: str) -> Any:
    with open(os.path.join(directory, "data.pkl"), "rb") as file:
        return pickle.load(file)


def npsave_write(directory: str, dataset: dict) -> None:
    for split, arrays in dataset.items():
        for name, array in arrays.items():
            np.save(os.path.join(directory, f"{split}-{name}.npy"), array)


def npsave_load(directory: str) -> Any:
    return {split: {name: np.load(os.path.join(directory, f"{split}-{name}.npy"),
                                  mmap_mode="r") for name in ("features", "labels")}
            for split in SPLITS}


def joblib_write(directory: str, dataset: dict) -> None:
    import joblib
    joblib.dump(dataset, os.path.join(directory, "data.joblib"))


def joblib_load(directory: str) -> Any:
    import joblib
    return joblib.load(os.path.join(directory, "data.joblib"), mmap_mode="r")


def diskcache_write(directory: str, dataset: dict) -> None:
    import diskcache
    # Its default size_limit (1 GB) would evict part of the dataset.
    with diskcache.Cache(directory, size_limit=2 ** 40) as cache:
        with cache.transact():
            for split, arrays in dataset.items():
                cache[split] = arrays


def diskcache_load(directory: str) -> Any:
    import diskcache
    return diskcache.Cache(directory)


def sqlitedict_write(directory: str, dataset: dict) -> None:
    from sqlitedict import SqliteDict
    with SqliteDict(os.path.join(directory, "data.sqlite"), journal_mode="WAL") as db:
        for split, arrays in dataset.items():
            db[split] = arrays
        db.commit()


def sqlitedict_load(directory: str) -> Any:
    from sqlitedict import SqliteDict
    return SqliteDict(os.path.join(directory, "data.sqlite"), flag="r", journal_mode="WAL")


#: name -> (write, load, the modules it needs beyond numpy and the standard library)
LIBRARIES = {
    "pstore": (pstore_write, pstore_load, ("pstore.backends.sqlite",)),
    "pickle": (pickle_write, pickle_load, ()),
    "np.save": (npsave_write, npsave_load, ()),
    "joblib": (joblib_write, joblib_load, ("joblib",)),
    "diskcache": (diskcache_write, diskcache_load, ("diskcache",)),
    "sqlitedict": (sqlitedict_write, sqlitedict_load, ("sqlitedict",)),
    "pstore-torch": (pstore_torch_write, pstore_torch_load, ("torch", "pstore.backends.sqlite")),
    "torch.save": (torch_write, torch_load, ("torch",)),
    "safetensors": (safetensors_write, safetensors_load, ("torch", "safetensors.torch")),
}
#: The libraries that are given the dataset as torch tensors.
TENSOR_LIBRARIES = {"pstore-torch", "torch.save", "safetensors"}


# -- measuring, in a child process per step --------------------------------------------------

def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")     # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def warm_page_cache(directory: str, size: int) -> None:
    """Write ``size`` bytes to a scratch file and delete it, untimed. On a virtual machine
    the first write into memory the page cache never used is slow (the host backs each
    page at its first touch: about 400 MB/s here, against 4 GB/s after), and which
    library meets it depends on the order they run in; writing first makes every
    library's measured write land on pages the kernel just freed."""
    scratch = os.path.join(directory, "warm-up")
    block = bytes(16 << 20)
    with open(scratch, "wb") as file:
        for _ in range(0, size, len(block)):
            file.write(block)
    os.unlink(scratch)


def child_write(library: str, directory: str, size_mb: int) -> dict:
    dataset: dict = make_dataset(size_mb)
    if library in TENSOR_LIBRARIES:
        import torch
        dataset = {split: {name: torch.from_numpy(array) for name, array in arrays.items()}
                   for split, arrays in dataset.items()}
    write = LIBRARIES[library][0]
    import_modules(library)     # imports are not part of the write
    warm_page_cache(directory, nbytes(dataset))
    reset_peak_rss()
    started = time.perf_counter()
    write(directory, dataset)
    written = time.perf_counter() - started
    peak = peak_rss()
    fsync_tree(directory)
    return {"write": written, "write_fsync": time.perf_counter() - started, "peak": peak,
            "bytes": nbytes(dataset)}


def child_load(library: str, directory: str) -> dict:
    load = LIBRARIES[library][1]
    import_modules(library)     # imports are not part of the load
    reset_peak_rss()
    started = time.perf_counter()
    opened = load(directory)
    first = float(opened["train"]["features"][0, 0])
    to_first = time.perf_counter() - started
    total = 0.0
    for split in SPLITS:
        arrays = opened[split]      # numpy arrays or CPU tensors (np.asarray: no copy)
        total += (float(np.asarray(arrays["features"]).sum(dtype=np.float64))
                  + float(np.asarray(arrays["labels"]).sum()))
    return {"first": to_first, "full": time.perf_counter() - started, "peak": peak_rss(),
            "check": first + total}


def run_child(step: str, library: str, directory: str, size_mb: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, library, directory,
                          str(size_mb)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{library}'s {step} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_modules(library: str) -> None:
    for module in LIBRARIES[library][2]:
        __import__(module)


def available(library: str) -> bool:
    try:
        import_modules(library)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every library; figures are their medians (default 3)")
    parser.add_argument("--peers", default=",".join(LIBRARIES),
                        help="comma-separated libraries to run (default: all)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, library, directory, size_mb = args.child
        result = (child_write(library, directory, int(size_mb)) if step == "write"
                  else child_load(library, directory))
        print(json.dumps(result))
        return

    libraries = []
    for library in (name for name in args.peers.split(",") if name):
        if available(library):
            libraries.append(library)
        else:
            print(f"{library}: not installed, skipped")
    rounds: dict[str, list[dict]] = {library: [] for library in libraries}
    checks = set()
    # Round after round of every library, so that a busy moment of the machine -- or
    # the first touch of memory the page cache never used, slow on a virtual machine --
    # does not fall on one library only; each figure is the median of the rounds.
    for _ in range(args.repeat):
        for library in libraries:
            directory = tempfile.mkdtemp(prefix=f"pstore-arrays-{library}-")
            try:
                result = {**run_child("write", library, directory, args.size_mb),
                          **{f"load_{k}": v for k, v in
                             run_child("load", library, directory, args.size_mb).items()}}
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            rounds[library].append(result)
            checks.add(round(result["load_check"], 3))
    if len(checks) > 1:
        raise SystemExit(f"the libraries loaded different data: {checks}")
    report({library: {key: statistics.median(result[key] for result in results)
                      for key in results[0]}
            for library, results in rounds.items()})


def report(results: dict[str, dict]) -> None:
    if not results:
        return
    size = next(iter(results.values()))["bytes"]
    mb = size / 1e6
    print(f"\ndataset: {mb:,.0f} MB (float32 features, int64 labels; train/valid/test)\n")
    print(f"{'library':<11} {'write MB/s':>10} {'+fsync MB/s':>11} {'peak RSS write':>14} "
          f"{'first element':>13} {'full read MB/s':>14} {'peak RSS load':>13}")
    for library, r in results.items():
        print(f"{library:<11} {mb / r['write']:>10,.0f} {mb / r['write_fsync']:>11,.0f} "
              f"{r['peak'] / 1e6:>11,.0f} MB {r['load_first'] * 1000:>10,.1f} ms "
              f"{mb / r['load_full']:>14,.0f} {r['load_peak'] / 1e6:>10,.0f} MB")
    if "pstore" not in results:
        return
    ours = results["pstore"]
    others = {name: r for name, r in results.items()
              if name != "pstore" and name not in TENSOR_LIBRARIES}
    print("\ntargets:")
    if others:
        fastest = max(others, key=lambda name: mb / others[name]["write_fsync"])
        ratio = others[fastest]["write_fsync"] / ours["write_fsync"]
        print(f"  write throughput, equal durability (fsynced): {ratio:.0%} of the fastest "
              f"({fastest}); target >= 80%")
        fastest_raw = max(others, key=lambda name: mb / others[name]["write"])
        print(f"  write throughput vs {fastest_raw} without its fsync: "
              f"{others[fastest_raw]['write'] / ours['write_fsync']:.0%}")
        readers = {name: r for name, r in others.items()
                   if name not in ("np.save", "joblib", "torch.save")}     # those map
        if readers:
            slowest_gap = min(r["load_first"] / ours["load_first"] for r in readers.values())
            print(f"  time to first element: {slowest_gap:,.0f}x faster than every loader that "
                  f"does not map ({', '.join(readers)}); target >= 10x")
    print(f"  peak RSS while writing: {ours['peak'] / size:.0%} of the dataset; "
          f"target <= 110%")
    baseline = results.get("np.save")
    for name in ("pstore", "pstore-torch"):
        if baseline is not None and name in results:
            print(f"  {name} write throughput vs np.save + fsync: "
                  f"{baseline['write_fsync'] / results[name]['write_fsync']:.0%}; target >= 100%")
    if "pstore-torch" in results:
        ours = results["pstore-torch"]
        for peer in ("torch.save", "safetensors"):
            if peer in results:
                theirs = results[peer]
                print(f"  pstore-torch vs {peer}: write+fsync throughput "
                      f"{theirs['write_fsync'] / ours['write_fsync']:.0%} of {peer}'s; "
                      f"first element in {ours['load_first'] * 1000:,.1f} ms, "
                      f"{peer} {theirs['load_first'] * 1000:,.1f} ms")


if __name__ == "__main__":
    main()
