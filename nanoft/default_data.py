"""The built-in dataset: questions about the Python standard library, answered by its own docstrings.

    path = default_data_path()                   # nanoft/default_data.jsonl: what `python train.py` trains on
    python -m nanoft.default_data --regenerate   # rebuild that file from this Python's docstrings

Each record is Alpaca-format: an instruction such as "What does `json.dumps` do in Python?" and, as the
output, the opening of that object's docstring (`inspect.getdoc`): real text written by the CPython
developers, not by us, and a style (terse, imperative: "Serialize ``obj`` to a JSON formatted ``str``.")
that an instruct model does not produce by itself, so the gain from fine-tuning shows in the val loss
within minutes.
The objects are the public functions, classes and methods of a fixed list of modules, in sorted order, so the
file is the same on every run of the same Python (the shipped one was made with Python 3.11; other versions
word some docstrings differently).
"""

import argparse
import importlib
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

DATA_FILE = Path(__file__).with_name("default_data.jsonl")
MODULES = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "builtins",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "traceback",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
)
BUILTIN_TYPES = (str, bytes, list, dict, set, frozenset, tuple, int, float, complex)
QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain `{name}` from the Python standard library.",
    "In Python, what is `{name}` for?",
    "Describe what `{name}` does.",
)
MIN_CHARS, ENOUGH_CHARS, MAX_CHARS = 40, 120, 600
KEEP_EVERY = 2  # every other object: ~700 records, so the default 3 epochs take ~10 minutes on 2 CPU cores


def public_objects(module_name: str):
    """(qualified name, object) of the module's own public functions and classes, and of their methods."""
    module = importlib.import_module(module_name)
    for name in sorted(dir(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module.__name__, module_name):
            continue  # imported from elsewhere: it is listed under its own module
        yield f"{module_name}.{name}" if module_name != "builtins" else name, obj
        if inspect.isclass(obj):
            yield from methods(obj, f"{module_name}.{name}" if module_name != "builtins" else name)


def methods(cls, prefix: str):
    for name in sorted(vars(cls)):
        obj = getattr(cls, name, None)
        if not name.startswith("_") and inspect.isroutine(obj):
            yield f"{prefix}.{name}", obj


def docstring_answer(obj) -> str | None:
    """The docstring's opening prose: paragraphs until ENOUGH_CHARS, without signatures, lists or examples."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    answer = []
    for paragraph in doc.split("\n\n"):
        lines = paragraph.splitlines()
        if not answer and ("-->" in lines[0] or "->" in lines[0] or re.match(r"^[\w.]+\(.*\)$", lines[0])):
            paragraph = "\n".join(lines[1:])  # a C function's "name(args) -> result" signature line
            if not paragraph.strip():
                continue
        lines = paragraph.splitlines()
        parameter_list = len(lines) > 1 and re.fullmatch(r"\w+", lines[0]) and lines[1].startswith(" ")
        if (
            parameter_list
            or paragraph.startswith((" ", ">>>", "*", "-", ":"))
            or re.search(r"::$|^\w+ --", paragraph, re.M)
        ):
            break  # parameter lists, doctests, bullet lists and reST directives read badly as an answer
        answer.append(" ".join(line.strip() for line in paragraph.splitlines()))
        if sum(map(len, answer)) >= ENOUGH_CHARS:
            break
    text = " ".join(answer).strip()
    return text if MIN_CHARS <= len(text) <= MAX_CHARS else None


def build_records() -> list[dict]:
    with warnings.catch_warnings():  # typing.io and friends warn when merely looked at
        warnings.simplefilter("ignore", DeprecationWarning)
        named = [item for module in MODULES for item in public_objects(module)]
    named += [item for cls in BUILTIN_TYPES for item in methods(cls, cls.__name__)]
    answers, seen_names, seen_answers = [], set(), set()
    for name, obj in named:
        answer = docstring_answer(obj)
        if answer is None or name in seen_names or answer in seen_answers:
            continue  # inherited methods repeat their parent's docstring word for word
        seen_names.add(name), seen_answers.add(answer)
        answers.append((name, answer))
    return [
        {"instruction": QUESTIONS[index % len(QUESTIONS)].format(name=name), "input": "", "output": answer}
        for index, (name, answer) in enumerate(answers[::KEEP_EVERY])
    ]


def default_data_path() -> Path:
    return DATA_FILE


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild nanoft/default_data.jsonl from stdlib docstrings.")
    parser.add_argument(
        "--regenerate", action="store_true", help="write the file (otherwise print a summary)"
    )
    args = parser.parse_args(argv)
    records = build_records()
    if args.regenerate:
        DATA_FILE.write_text("".join(json.dumps(record) + "\n" for record in records))
    print(
        f"{len(records)} records from Python {sys.version.split()[0]}"
        + (f" -> {DATA_FILE}" if args.regenerate else "")
    )


if __name__ == "__main__":
    main()
