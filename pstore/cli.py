"""The ``pstore`` command: look inside stores and pickles, check, shrink, copy and convert.

Every subcommand only reads unless its name says it writes (gc, vacuum, copy,
convert, demo), and none unpickles a record unless it says so (show loads under
restricted loading). A store's backend is told from its files (``--backend``
overrides). Errors are one line on stderr, exit status 1 (2 for a wrong command
line); ``--debug`` shows the traceback. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import engine

__all__ = ["main"]


def _open(args: argparse.Namespace, flag: str = "r", path: str | None = None) -> Any:
    import pstore

    return pstore.open(path or args.store, flag, backend=args.backend)


def _count(number: int, noun: str) -> str:
    """``1 key``, ``2 keys``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _size(count: int) -> str:
    """A byte count for people: 1.5 MB."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


@contextmanager
def _progress(total: int | None, what: str,
              unit: str = " keys") -> Iterator[Callable[[int], None]]:
    """A callback advancing a progress bar (tqdm, on a terminal), or doing nothing."""
    if not sys.stdout.isatty():
        yield lambda count: None
        return
    try:
        from tqdm import tqdm
    except ImportError:     # the extra is not installed: the summary line says it all
        yield lambda count: None
        return
    with tqdm(total=total, desc=what, unit=unit, leave=False) as bar:
        yield bar.update


def _is_store(path: str) -> bool:
    from .backends import detect_backend

    return detect_backend(path) is not None


# -- subcommands ---------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = [(key, info) for key, info in store.describe(args.pattern)]
    width = max((len(key) for key, _ in rows), default=3)
    print(f"{'key':<{width}}  {'oid':>6}  {'bytes':>9}  {'blobs':>9}  kind")
    for key, info in rows:
        kind = f"{info.kind} (Persistent)" if info.persistent else info.kind
        blobs = _size(info.blob_bytes) if info.blobs else "-"
        print(f"{key:<{width}}  {info.object_id:>6}  {info.size:>9}  {blobs:>9}  {kind}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args) as store:
        info = store.info()
    print(f"store:          {info.path}")
    print(f"backend:        {info.backend} -- {info.module}")
    print(f"format version: {info.format_version}")
    print(f"keys:           {info.keys}")
    print(f"records:        {info.records} ({_size(info.record_bytes)})")
    print(f"blobs:          {info.blobs} ({_size(info.blob_bytes)})")
    print(f"key:            {info.key_fingerprint or '-'} (created with), "
          f"{store.key_fingerprint} (yours)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.dis:
            from .store.inspection import disassemble_record

            print(disassemble_record(*store.raw_record(args.key)), end="")
            return 0
        print(repr(store.load_restricted(args.key, allow=args.allow)))
    return 0


def cmd_dis(args: argparse.Namespace) -> int:
    if args.key is None:
        print(engine.disassemble(_read_file(args.file)), end="")
        return 0
    from .store.inspection import disassemble_record

    args.store = args.file
    with _open(args) as store:
        print(disassemble_record(*store.raw_record(args.key)), end="")
    return 0


def _read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def cmd_globals(args: argparse.Namespace) -> int:
    if args.key is None and not _is_store(args.file):
        names = [f"{module}.{name}" for module, name in engine.globals_of(_read_file(args.file))]
    else:
        args.store = args.file
        with _open(args) as store:
            names = store.globals(args.key)
    for name in names:
        print(name)
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    with _open(args, "w") as store:
        keys = args.keys or None
        names = store.globals() if keys is None else \
            sorted({name for key in keys for name in store.globals(key)})
        what = "every record" if keys is None else f"the records of {', '.join(keys)}"
        print(f"{what} would import, once trusted:")
        for name in names:
            print(f"  {name}")
        if not names:
            print("  (no globals)")
        if not args.yes:
            if not sys.stdin.isatty():
                raise SystemExit("pstore trust: not a terminal; review the list and pass --yes")
            answer = input(f"sign {what} with your key, so they load with full pickle "
                           f"semantics? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing signed")
                return 1
        count = store.trust(keys)
    print(f"signed {count} records with key {store.key_fingerprint}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as store:
        report = store.verify()
    print(report)
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args, "w") as store:
        before = store.info()
        deleted = store.gc()
        after = store.info()
    print(f"deleted {deleted} unreachable records "
          f"({_size(before.record_bytes - after.record_bytes)}) and "
          f"{before.blobs - after.blobs} unused blobs "
          f"({_size(before.blob_bytes - after.blob_bytes)}); "
          f"`pstore vacuum` gives the records' space back to the file system")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    with _open(args, "w") as store:
        freed = store.vacuum()
    print(f"the store's files shrank by {_size(freed)}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    import pstore

    # Records are what takes the time; counting them first would read them twice.
    with _progress(None, "copy", " records") as advance:
        count = pstore.copy(args.source, args.target, backend=args.target_backend,
                            source_backend=args.backend, flag=args.flag, progress=advance)
    print(f"copied {_count(count, 'key')} from {args.source} into {args.target}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import pstore

    with _progress(None, "convert") as advance:
        report = pstore.convert(args.source, args.target, kind=args.kind, keys=args.keys,
                                table=args.table, backend=args.target_backend,
                                flag=args.flag, progress=advance)
    print(f"copied {_count(report.copied, 'key')} from the {report.kind} {args.source} into "
          f"{args.target}" + (f"; left out {report.expired} expired entries"
                              if report.expired else ""))
    for note in report.notes:
        print(note)
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


# -- the command line ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pstore", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help_text: str,
                *, store: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if store:
            sub.add_argument("store", help="the store's path")
            sub.add_argument("--backend", help="the store's backend (default: told from its "
                                                "files)")
        sub.set_defaults(run=run)
        return sub

    ls = command("ls", cmd_ls, "list keys with their record's size, kind and blob bytes "
                               "(nothing is unpickled)")
    ls.add_argument("pattern", nargs="?", help="only keys matching this glob pattern")
    command("info", cmd_info, "backend, format version, key/record/blob counts and bytes")
    show = command("show", cmd_show, "print one key's value, loaded under restricted loading "
                                     "(or its disassembly)")
    show.add_argument("key")
    show.add_argument("--dis", action="store_true", help="disassemble instead of loading")
    show.add_argument("--allow", action="append", default=[], metavar="MODULE.NAME",
                      help="a global restricted loading may resolve too (repeatable)")
    for name, run, help_text in [
            ("dis", cmd_dis, "disassemble a pickle file, or one key's record of a store"),
            ("globals", cmd_globals, "list the module.name globals a pickle file, a store "
                                     "or one key's records would import (nothing imported)")]:
        sub = command(name, run, help_text, store=False)
        sub.add_argument("file", help="a pickle file, or a store")
        sub.add_argument("key", nargs="?", help="with a store: one key (globals: and what "
                                                "it refers to)")
        sub.add_argument("--backend", help="the store's backend (default: told from its files)")
    trust = command("trust", cmd_trust, "list the globals of the records reachable from KEYs "
                                        "(or all), ask, and sign them with your key (writes)")
    trust.add_argument("keys", nargs="*", metavar="KEY")
    trust.add_argument("--yes", action="store_true", help="do not ask")
    command("verify", cmd_verify, "check every record, reference, blob and signature; exit "
                                  "status 1 if anything is damaged")
    command("gc", cmd_gc, "delete the records no key reaches and the blobs no record uses "
                          "(writes)")
    command("vacuum", cmd_vacuum, "give the space of deleted records back to the file system "
                                  "(writes)")
    for name, run, help_text in [
            ("copy", cmd_copy, "copy a store into a new store, any backend to any backend, "
                               "keeping identity and blobs (writes DST)"),
            ("convert", cmd_convert, "copy a shelve file, sqlitedict file, diskcache folder or "
                                     "ZODB FileStorage into a store (writes DST)")]:
        sub = command(name, run, help_text, store=False)
        sub.add_argument("source", metavar="SRC")
        sub.add_argument("target", metavar="DST")
        sub.add_argument("--backend", help="SRC's backend (copy; default: told from its files)")
        sub.add_argument("--target-backend", help="DST's backend (default: sqlite, or DST's "
                                                  "if it exists)")
        sub.add_argument("--flag", default="c", choices=["c", "n", "w"],
                         help="how DST is opened: c (create if missing; default), n (empty "
                              "it first), w (must exist)")
    convert = commands.choices["convert"]
    convert.add_argument("--kind", choices=["shelve", "sqlitedict", "diskcache", "zodb"],
                         help="SRC's kind (default: told from its files)")
    convert.add_argument("--keys", choices=["refuse", "repr"], default="refuse",
                         help="keys that are not str: refuse (default, listing them) or "
                              "store under repr(key)")
    convert.add_argument("--table", help="sqlitedict: the one table to copy (default: all)")
    demo = command("demo", cmd_demo, "store an object graph and reload it in another process",
                   store=False)
    demo.add_argument("path", nargs="?", help="where to write the store (default: a "
                                              "temporary file)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("pstore: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"pstore {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    if type(error) is KeyError and error.args:
        return f"no key {error.args[0]!r}"
    message = str(error)
    if isinstance(error, OSError) and error.filename is not None:
        message = f"{error.strerror or message}: {error.filename}"
    text = " ".join(message.split()) or type(error).__name__
    # pstore's errors and OSErrors say what happened; others need their type to.
    return text if type(error).__module__.startswith("pstore") or isinstance(error, OSError) \
        else f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
