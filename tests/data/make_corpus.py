"""Write the pickle corpus of the running interpreter into corpus/<major.minor>/.

Run it with every Python the corpus covers (it is Python 2.7-compatible), e.g.

    for v in 2.7.18 3.6.15 3.7.16 3.8.18 3.9.18 3.10.13 3.11.7 3.12.1 3.13.0; do
        ~/.pyenv/versions/$v/bin/python tests/data/make_corpus.py
    done

For each protocol the interpreter supports it pickles every value of
:func:`values` into ``<name>-p<protocol>.pickle`` and lists the files, with
their SHA-256, in ``MANIFEST.json``. A value the interpreter cannot pickle at a
protocol (e.g. ``__slots__`` below protocol 2) is listed under ``skipped`` with
the error instead. To keep the corpus small, :func:`wanted` leaves out a few
values at some protocols. The output is the same on every run: the script re-runs
itself with PYTHONHASHSEED=0 so that sets and dicts of strings keep one order.
"""

import collections
import datetime
import decimal
import fractions
import glob
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# No corpus_classes.pyc or __pycache__ beside the data (.gitignore keeps all of tests/data).
sys.dont_write_bytecode = True

import corpus_classes as cc  # noqa: E402  (needs HERE on sys.path)

LENGTHS = (0, 1, 999, 1000, 1001, 2500)
#: Lengths around the batch size of APPENDS/SETITEMS/ADDITEMS (1000), which protocol 0
#: does not batch: there they would only repeat the 2500 case, so they are not written.
BATCH_EDGES = (999, 1000, 1001)
#: Names of the values written only at the highest protocol, and only if it frames (4+).
BIG = ("bytes_66k",)


def wanted(name, protocol):
    """Whether the value called ``name`` is written at ``protocol``."""
    if name in BIG:
        return protocol == pickle.HIGHEST_PROTOCOL and protocol >= 4
    suffix = name.rsplit("_", 1)[-1]
    return not (protocol == 0 and suffix.isdigit() and int(suffix) in BATCH_EDGES)


def recursive_list():
    value = []
    value.append(value)
    return value


def recursive_dict():
    value = {}
    value[u"self"] = value
    return value


def recursive_via_tuple():
    value = []
    value.append((value, 1))
    return value


def recursive_instance():
    value = cc.NewStyle()
    value.a = value
    value.b = [value]
    return value


def shared_sublists():
    inner = [1, 2]
    return [inner, inner, {u"x": inner}, (inner, inner)]


def shared_instance():
    obj = cc.NewStyle(1, u"one")
    return {u"first": obj, u"second": [obj, obj]}


def nested(depth):
    value = []
    for i in range(depth):
        value = [i, value, (i,)]
    return value


def zone_values():
    """The values that need datetime.timezone (Python 3.2+); none under Python 2."""
    timezone = getattr(datetime, "timezone", None)
    if timezone is None:
        return {}
    india = timezone(datetime.timedelta(hours=5, minutes=30), u"IST")
    return {
        u"datetime_utc": datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, timezone.utc),
        u"datetime_tz": datetime.datetime(1999, 12, 31, 12, 0, tzinfo=india),
        u"time_tz": datetime.time(7, 8, 9, 10, india),
        u"timezone": india,
    }


def fold_values():
    """A datetime with fold=1 (Python 3.6+; protocol 4+ keeps the fold)."""
    try:
        return {u"datetime_fold": datetime.datetime(2023, 11, 5, 1, 30, fold=1)}
    except TypeError:
        return {}


def values():
    """Map each corpus name to the value pickled under that name."""
    result = {
        "none": None,
        "true": True,
        "false": False,
        "bools": [True, False, True],
        "ints_small": [0, 1, -1, 127, 128, 255, 256, -255, -256, 65535, 65536],
        "ints_2_31": [2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 2 ** 32],
        "int_2_63": 2 ** 63,
        "int_2_64": 2 ** 64,
        "int_neg_2_64": -2 ** 64,
        "int_huge": 7 ** 900,
        "int_huge_neg": -(3 ** 2000),
        "floats": [0.0, -0.0, 1.5, -2.25, 0.1, 1e300, 5e-324, 1.0 / 3],
        "float_inf": float("inf"),
        "float_ninf": float("-inf"),
        "float_nan": float("nan"),
        "float_negzero": -0.0,
        "str_empty": u"",
        "str_ascii": u"hello, world",
        "str_latin1": u"caf\xe9 na\xefve",
        "str_bmp": u"\u20ac \u4e2d\u6587 \u0416",
        "str_astral": u"\U0001f600 \U00010348",
        "str_escapes": u"back\\slash\nnew\rline\ttab\x00nul \\u0041 end\\",
        "str_long": u"\xe9t\xe9 " * 100,
        "bytes_empty": b"",
        "bytes_ascii": b"abc",
        "bytes_high": b"\x00\x80\xff\xfe bytes \n\\",
        "bytes_long": bytes(bytearray(range(256))) * 2,
        "bytearray_empty": bytearray(),
        "bytearray": bytearray(b"\x00\x01\xffmutable"),
        # Past the 64 KiB frame size: at protocol 4+ a frame, this payload outside any
        # frame, then a frame again.
        "bytes_66k": [u"before", b"\xab" * 66000, u"after"],
        "complex": complex(1.5, -2),
        "complex_inf": [complex(float("inf"), 0), complex(0, -0.0)],
        "date": datetime.date(2024, 2, 29),
        "time": datetime.time(12, 34, 56, 789),
        "datetime": datetime.datetime(1970, 1, 1, 0, 0, 0, 1),
        "datetime_max": datetime.datetime.max,
        "timedelta": datetime.timedelta(days=-1, seconds=5, microseconds=7),
        "decimal": decimal.Decimal("3.14159265358979323846"),
        "decimal_special": [decimal.Decimal("-0"), decimal.Decimal("-Infinity"),
                            decimal.Decimal("NaN"), decimal.Decimal("1E+1000")],
        "fraction": fractions.Fraction(-22, 7),
        "ordereddict": collections.OrderedDict([(u"b", 1), (u"a", [2]), (u"c", None)]),
        "defaultdict": collections.defaultdict(list, {u"k": [1, 2], u"e": []}),
        "deque": collections.deque([1, u"two", 3.0], maxlen=5),
        "counter": collections.Counter(u"abracadabra"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "old_style": cc.OldStyle(u"old"),
        "new_style": cc.NewStyle(1, [u"b"]),
        "slotted": cc.Slotted(1, u"y"),
        "with_state": cc.WithState({u"nested": (1, 2)}),
        "with_reduce": cc.WithReduce(u"reduced"),
        "with_newargs": cc.WithNewArgs(3, u"four"),
        "nested_class_instance": cc.Outer.Inner(5),
        "class_ref": cc.NewStyle,
        "nested_class_ref": cc.Outer.Inner,
        "builtin_ref": len,
        "recursive_list": recursive_list(),
        "recursive_dict": recursive_dict(),
        "recursive_via_tuple": recursive_via_tuple(),
        "recursive_instance": recursive_instance(),
        "shared_sublists": shared_sublists(),
        "shared_instance": shared_instance(),
        "nested_deep": nested(60),
        "mixed": {u"a": [1, (2, 3), {u"b": set([4]), u"c": frozenset([u"x"])}],
                  u"b": ((), [], {}), u"\xe9": b"\x01"},
    }
    for length in LENGTHS:
        # Small elements keep the corpus small; sets and dict keys must be distinct.
        items = [None if i % 10 else i for i in range(length)]
        result["tuple_%d" % length] = tuple(items)
        result["list_%d" % length] = items
        result["dict_%d" % length] = dict.fromkeys(range(length))
        result["set_%d" % length] = set(range(length))
        result["frozenset_%d" % length] = frozenset(range(length))
    for extra in (zone_values(), fold_values()):
        for name, value in extra.items():
            result[str(name)] = value
    return result


def manifest_text(manifest):
    """JSON with one line per entry: compact, and a regenerated corpus diffs line by line."""
    lines = ["{"]
    for key in sorted(manifest):
        value = manifest[key]
        if isinstance(value, list):
            rows = [json.dumps(row, sort_keys=True) for row in value]
            lines.append('"%s": [\n%s\n],' % (key, ",\n".join(rows)))
        else:
            lines.append('"%s": %s,' % (key, json.dumps(value)))
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines) + "\n}\n"


def write_corpus(out_dir):
    """Write this interpreter's pickles and MANIFEST.json into ``out_dir``."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    for old in glob.glob(os.path.join(out_dir, "*.pickle")):
        os.remove(old)
    entries = []
    skipped = []
    corpus = values()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for name in sorted(corpus):
            if not wanted(name, protocol):
                continue
            try:
                data = pickle.dumps(corpus[name], protocol)
            except Exception as error:  # recorded: which values a version can't pickle
                skipped.append({"name": name, "protocol": protocol,
                                "error": "%s: %s" % (type(error).__name__, error)})
                continue
            file_name = "%s-p%d.pickle" % (name, protocol)
            with open(os.path.join(out_dir, file_name), "wb") as stream:
                stream.write(data)
            entries.append({"name": name, "protocol": protocol, "file": file_name,
                            "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"python": "%d.%d.%d" % sys.version_info[:3], "entries": entries,
                "skipped": skipped}
    with io.open(os.path.join(out_dir, "MANIFEST.json"), "wb") as stream:
        stream.write(manifest_text(manifest).encode("ascii"))


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                                 env=env))
    version = "%d.%d" % sys.version_info[:2]
    write_corpus(os.path.join(HERE, "corpus", version))


if __name__ == "__main__":
    main()
