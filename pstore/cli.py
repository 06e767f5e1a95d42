"""The ``pstore`` command: a demo, and tools to look inside pickles without running them.

    pstore demo [PATH]                 store an object graph, reload it in another process
    pstore dis FILE                    disassemble a pickle file (opcodes, arguments, memo)
    pstore globals FILE                list the module.name pairs a pickle would import
    pstore keys STORE                  list a store's keys (opened read-only)
    pstore gc STORE                    delete the records no key reaches
    pstore convert-shelve SHELF STORE  copy a stdlib shelve file into a pstore store
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Sequence

from . import engine


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def cmd_dis(args: argparse.Namespace) -> int:
    print(engine.disassemble(_read(args.file)), end="")
    return 0


def cmd_globals(args: argparse.Namespace) -> int:
    for module, name in engine.globals_of(_read(args.file)):
        print(f"{module}.{name}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import pstore

    with pstore.open(args.store, "r", backend=args.backend) as store:
        for key in store:
            print(key)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    import pstore

    with pstore.open(args.store, "w", backend=args.backend) as store:
        print(f"deleted {store.gc()} unreachable records")
    return 0


def cmd_convert_shelve(args: argparse.Namespace) -> int:
    import pstore

    count = pstore.convert_shelve(args.shelf, args.store, backend=args.backend)
    print(f"copied {count} keys from {args.shelf} into {args.store}")
    return 0


# The demo's second half runs in a child process, so that what it shows came from the file.
_RELOAD = """
import sys, pstore
with pstore.open(sys.argv[1], "r") as s:
    run1, run2, config = s["runs/1"], s["runs/2"], s["config"]
    assert run1["config"] is run2["config"] is config, "identity was lost"
    assert run1["parent"] is None and run2["parent"] is run1
    print(f"  reloaded in process {__import__('os').getpid()}: {len(s)} keys")
    print(f"  runs/1 and runs/2 share one config object: {run1['config'] is run2['config']}")
    print(f"  runs/2's parent is runs/1: {run2['parent'] is run1}")
    print(f"  config = {config}")
    print(f"  scores of run 2 = {run2['scores'][:5]}...")
"""


def cmd_demo(args: argparse.Namespace) -> int:
    import pstore

    directory = None
    path = args.path
    if path is None:
        directory = tempfile.TemporaryDirectory(prefix="pstore-demo-")
        path = os.path.join(directory.name, "demo.db")
    try:
        config = {"model": "resnet", "lr": 0.01, "layers": [64, 128, 256]}
        run1 = {"name": "run 1", "config": config, "scores": [0.5, 0.61, 0.7], "parent": None}
        run2 = {"name": "run 2", "config": config,
                "scores": [round(0.5 + i / 100, 2) for i in range(50)], "parent": run1}
        with pstore.open(path, "n") as s, s.transaction():
            s["config"] = config
            s["runs/1"] = run1
            s["runs/2"] = run2
        print(f"stored 3 keys sharing one config object in {path} (pid {os.getpid()})")
        subprocess.run([sys.executable, "-c", _RELOAD, path], check=True)
        print("demo ok")
        return 0
    finally:
        if directory is not None:
            directory.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pstore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="store an object graph and reload it elsewhere")
    demo.add_argument("path", nargs="?", help="where to write the store (default: a temporary file)")
    demo.set_defaults(run=cmd_demo)
    dis = commands.add_parser("dis", help="disassemble a pickle file without running it")
    dis.add_argument("file")
    dis.set_defaults(run=cmd_dis)
    names = commands.add_parser("globals", help="list the globals a pickle file would import")
    names.add_argument("file")
    names.set_defaults(run=cmd_globals)
    for name, run, help_text in [("keys", cmd_keys, "list a store's keys"),
                                 ("gc", cmd_gc, "delete the records no key reaches")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("store")
        command.add_argument("--backend", default="sqlite", help="sqlite (default) or dbm")
        command.set_defaults(run=run)
    convert = commands.add_parser("convert-shelve",
                                  help="copy a stdlib shelve file into a pstore store")
    convert.add_argument("shelf", help="the shelve file (as given to shelve.open)")
    convert.add_argument("store", help="the pstore store to create or add to")
    convert.add_argument("--backend", default="sqlite", help="the store's backend")
    convert.set_defaults(run=cmd_convert_shelve)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
