"""The workloads ``codefleet tune`` and benchmarks/scenarios/speculative-decoding measure.

- ``edits``: code edits built from real source files, Python's own standard library (the modules
  below, read from the running interpreter's stdlib folder: every machine with Python 3.11 has them).
  Each request gives one function and asks for it back with one identifier renamed, so a correct
  answer copies almost all of its input: the traffic speculation is for (editor "rename" and
  refactor commands, agents rewriting files).
- ``chat``: the control with little copying: short explanations and new functions from a one-line
  description; the answer is new text, not the prompt's.

Items are deterministic and never repeat within a workload (a cell takes items from an offset on).
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

#: Plain-Python stdlib modules with many short functions.
MODULES = ("textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "calendar", "string",
           "difflib", "ntpath", "posixpath", "genericpath", "base64", "quopri", "uu", "csv", "statistics",
           "fractions", "ipaddress", "inspect", "argparse", "pprint", "tokenize", "json/decoder",
           "json/encoder", "email/utils", "urllib/parse", "http/cookies", "configparser")
MIN_LINES, MAX_LINES = 8, 30

Messages = list[dict[str, str]]


@cache
def _functions() -> tuple[tuple[str, str, str], ...]:
    """(source, old name, new name) per function: its first argument (not self/cls) of 3+ letters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str, str]] = []
    for mod in MODULES:
        path = stdlib / f"{mod}.py"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno is None:
                continue
            n = node.end_lineno - node.lineno + 1
            args = [a.arg for a in node.args.args if a.arg not in ("self", "cls") and len(a.arg) >= 3]
            if not MIN_LINES <= n <= MAX_LINES or not args:
                continue
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            body = lines[start:node.end_lineno]
            indent = min(len(x) - len(x.lstrip()) for x in body if x.strip())
            out.append(("\n".join(x[indent:] for x in body), args[0], f"{args[0]}_value"))
    return tuple(out)


def _take(items: tuple[object, ...] | list[str], n: int, offset: int, name: str) -> None:
    if offset + n > len(items):
        raise ValueError(f"workload {name} has {len(items)} distinct items; {n} from item {offset} on would repeat "
                         f"some (fewer --requests, or fewer concurrencies)")


def edits(n: int, offset: int = 0) -> list[Messages]:
    fns = _functions()
    _take(fns, n, offset, "edits")
    items = [fns[offset + i] for i in range(n)]
    return [[{"role": "user", "content": f"Rename the parameter `{old}` to `{new}` in this Python function. "
              f"Reply with the whole function and nothing else.\n\n```python\n{src}\n```"}]
            for src, old, new in items]


CONCEPTS = ("a hash map", "recursion", "a race condition", "garbage collection", "a closure", "big-O notation",
            "a mutex", "tail calls", "memoization", "a linked list", "dependency injection", "a generator",
            "lazy evaluation", "a binary heap", "an index in a database", "eventual consistency",
            "a deadlock", "type inference", "a virtual table", "copy-on-write", "a bloom filter",
            "backpressure", "idempotency", "a unit test")
TASKS = ("checks whether a number is prime", "reverses the words of a sentence", "counts vowels in a string",
         "merges two sorted lists", "returns the n-th Fibonacci number", "flattens a nested list",
         "finds the most common element of a list", "converts Celsius to Fahrenheit",
         "checks whether a string is a palindrome", "computes the greatest common divisor",
         "removes duplicates while keeping order", "parses a date in YYYY-MM-DD form",
         "rotates a list by k places", "transposes a matrix", "validates an email address roughly",
         "groups words by their first letter", "computes a running average", "chunks a list into pairs",
         "returns the digits of an integer", "checks balanced parentheses", "computes a factorial",
         "sums the squares of a list", "finds the longest word", "capitalizes every word")


def chat(n: int, offset: int = 0) -> list[Messages]:
    items = [f"Explain {c} in three sentences." for c in CONCEPTS]
    items += [f"Write a short Python function that {t}." for t in TASKS]
    _take(items, n, offset, "chat")
    return [[{"role": "user", "content": items[offset + i]}] for i in range(n)]


WORKLOADS: dict[str, Callable[[int, int], list[Messages]]] = {"edits": edits, "chat": chat}
