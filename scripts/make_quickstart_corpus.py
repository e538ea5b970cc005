"""Build a small English corpus offline: the docstrings of this machine's Python standard library.

    python scripts/make_quickstart_corpus.py --output quickstart_out/corpus.jsonl [--max-mb 4]

Walks the standard-library modules (pkgutil over the stdlib folder, plus the built-in modules),
imports each one (skipping those that fail, print or need a GUI), and writes one JSONL record
`{"text": ...}` per docstring of the module, its classes and their methods, and its functions.
Docstrings shorter than --min-chars are skipped; duplicates are dropped. The text comes from the
local Python installation, so nothing is downloaded and nothing of it belongs in the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import sysconfig
import warnings
from typing import Iterator, List, Set

# Modules that start GUIs, open consoles, print on import or are slow / platform-specific.
SKIP_PREFIXES = (
    "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "venv", "pydoc_data", "msilib", "winreg", "winsound", "_msi", "msvcrt", "nturl2path",
    "site", "sitecustomize", "usercustomize", "xxsubtype", "xxlimited", "_xx", "__phello__", "__hello__",
    "curses", "readline", "pty", "tty", "crypt", "nis", "spwd", "ossaudiodev",
)


def stdlib_module_names() -> List[str]:
    names: Set[str] = set(sys.builtin_module_names)
    stdlib = sysconfig.get_paths()["stdlib"]

    def walk(path: str, prefix: str) -> None:  # pkgutil.walk_packages would import every package
        for info in pkgutil.iter_modules([path]):
            name = prefix + info.name
            names.add(name)
            if info.ispkg:
                walk(os.path.join(path, info.name), name + ".")

    walk(stdlib, "")
    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+: top-level names only
        names &= {n for n in names if n.split(".")[0] in sys.stdlib_module_names}
    def wanted(n: str) -> bool:
        parts = n.split(".")
        return not n.startswith(SKIP_PREFIXES) and not any(
            p in ("test", "tests", "idle_test") or p.startswith("test_") for p in parts
        )

    return sorted(n for n in names if wanted(n))


def _clean(doc: str) -> str:
    return inspect.cleandoc(doc).strip()


def docstrings(module) -> Iterator[str]:
    if isinstance(module.__doc__, str):
        yield module.__doc__
    for _name, obj in sorted(vars(module).items(), key=lambda kv: kv[0]):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__
            for _m, member in sorted(vars(obj).items(), key=lambda kv: kv[0]):
                doc = getattr(member, "__doc__", None)
                if (inspect.isfunction(member) or inspect.ismethoddescriptor(member)) and isinstance(doc, str):
                    yield doc
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if isinstance(obj.__doc__, str):
                yield obj.__doc__


def build(output: str, max_bytes: int, min_chars: int) -> dict:
    seen: Set[str] = set()
    written = docs = modules = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in stdlib_module_names():
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - any import failure (incl. SystemExit) skips the module
                continue
            modules += 1
            for doc in docstrings(module):
                text = _clean(doc)
                if len(text) < min_chars or text in seen:
                    continue
                seen.add(text)
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= max_bytes:
                    return {"modules": modules, "documents": docs, "bytes": written}
    return {"modules": modules, "documents": docs, "bytes": written}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of JSONL")
    p.add_argument("--min-chars", type=int, default=80, help="skip shorter docstrings")
    args = p.parse_args(argv)
    stats = build(args.output, int(args.max_mb * 1e6), args.min_chars)
    print(f"wrote {args.output}: {stats['documents']} docstrings from {stats['modules']} modules, "
          f"{stats['bytes'] / 1e6:.2f} MB")
    return 0 if stats["documents"] else 1


if __name__ == "__main__":
    sys.exit(main())
