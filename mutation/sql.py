"""Mutation testing of the stores' rule conditions: the SQL that decides and guards a refund.

mutmut mutates Python, not the SQL inside its strings. This script finds the
refund statements' conditions by pattern (so it keeps working when a statement
gains a CTE or a column) and makes one textual mutant at a time:

- a comparison moved by one: `<=` to `<`, `x <= y` to `x <= y + 1` and `x <= y - 1`,
  and the same for `<`, `>=`, `>`; an equality of amounts/units to `<=`, `>=`, `<>`;
- a condition of a WHERE or ON clause dropped (replaced by `true`);
- a `NOT` dropped;
- a value dropped from, or added to, an `IN ('SUCCESS', 'SETTLED')` list;
- a literal (status, capability, transaction type) swapped for another of its kind.

Each mutant is written into a copy of the project and the tests of that store
run against it (the edge tests first, then the one-statement property test and
the other store tests); a mutant that no test fails survives. The score and
every survivor are printed; `--list` only prints the mutants.

    python -m mutation.sql [--list] [--store pg|sqlite] [--only 15,19]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("REFUND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Where the rules are: per store, the module-level statements (by name) and the
# functions whose SQL string literals are mutated.
STORES = {
    # The lists and literals of the rules (refundable statuses, capabilities) are
    # written from service/domain.py's constants (service/stores/sql.py); mutmut
    # mutates those constants, these mutants the conditions around them.
    "pg": {
        "file": "service/stores/postgres_refund.py",
        "statements": {"_SNAPSHOT", "_APPLY", "_IN_ONE_STATEMENT", "_BY_ID", "_BY_REFERENCE", "_INSERT_REFUND"},
        "functions": {"in_one_statement"},
        "tests": [["tests/integration/test_rule_boundaries_sql.py", "-k", "postgres"],
                  ["tests/integration/test_refund_at_once.py", "tests/integration/test_database_guards.py",
                   "-k", "not sqlite"]],
    },
    "sqlite": {
        "file": "service/stores/sqlite.py",
        "statements": {"SNAPSHOT", "CREDENTIALS_HOLD", "DEBIT", "MARK_REFUNDED"},
        "functions": {"_insert_refund", "_read_snapshot"},
        "tests": [["tests/integration/test_rule_boundaries_sql.py", "-k", "sqlite"],
                  ["tests/integration/test_refund_at_once.py", "tests/integration/test_database_guards.py",
                   "-k", "not postgres"]],
    },
}

# Values that may stand in for one another in a swapped literal.
FAMILIES = [
    ["OPEN", "SUCCESS", "SETTLED", "VOIDED", "CLOSED", "REFUNDED", "PARTIALLY_REFUNDED"],
    ["NONE", "FULL_ONLY", "FULL_AND_PARTIAL"],
    ["SALE", "REFUND"],
    ["ACTIVE", "SUSPENDED"],
]
STATUSES = FAMILIES[0]

TERM = r"(?:\$\d+(?:::\w+)?|\?|\b[a-z_]+\.[a-z_]+\b|\b[a-z_]+\b|\d+)"
COMPARISON = re.compile(rf"(?P<lhs>{TERM})\s*(?P<op><=|>=|<>|<|>|=)\s*(?P<rhs>{TERM})")
MONEY = re.compile(r"\b(units|amount|unsettled)\b|^\$4$|^\?$")
NEIGHBOUR = {"<=": "<", "<": "<=", ">=": ">", ">": ">="}
CLAUSE_START = re.compile(r"\b(WHERE|ON)\b")
CLAUSE_END = re.compile(r"\b(RETURNING|ORDER BY|GROUP BY|LIMIT|LEFT JOIN|JOIN|WHERE|SELECT|FROM|UNION)\b")
SET_CLAUSE = re.compile(r"\bSET\b(?P<body>.*?)(?=\bWHERE\b|\bFROM\b|\bRETURNING\b|$)", re.S)
IN_LIST = re.compile(r"\bIN\s*\((?P<items>\s*'[A-Z_]+'(?:\s*,\s*'[A-Z_]+')*\s*)\)")
LITERAL = re.compile(r"(?P<before>(?:=|THEN|ELSE)\s*)'(?P<value>[A-Z_]+)'")


@dataclass(frozen=True)
class Mutant:
    store: str
    line: int
    start: int      # offsets in the file's text
    end: int
    replacement: str
    original: str

    def describe(self) -> str:
        return f"{STORES[self.store]['file']}:{self.line}: {' '.join(self.original.split())!r} -> " \
               f"{' '.join(self.replacement.split())!r}"


def rule_literals(source: str, statements: set[str], functions: set[str]) -> list[tuple[int, int]]:
    """(start, end) offsets of the SQL string literals that hold the rules: the named
    module-level statements, and string constants inside the named functions."""
    tree = ast.parse(source)
    offsets = _line_offsets(source)
    spans = []

    def span(node) -> tuple[int, int]:
        return offsets[node.lineno - 1] + node.col_offset, offsets[node.end_lineno - 1] + node.end_col_offset

    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in statements:
            for value in ast.walk(node.value):
                if isinstance(value, (ast.Constant, ast.JoinedStr)) and _is_text(value):
                    spans.append(span(value))
                    break
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in functions:
            for value in ast.walk(node):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and \
                        re.search(r"\b(WHERE|ON)\b", value.value):
                    spans.append(span(value))
    return sorted(set(spans))


def _is_text(node) -> bool:
    return isinstance(node, ast.JoinedStr) or isinstance(node.value, str)


def _line_offsets(source: str) -> list[int]:
    offsets, total = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(total)
        total += len(line)
    return offsets


def mutants_of(store: str, source: str) -> list[Mutant]:
    config = STORES[store]
    found: dict[tuple[int, int, str], Mutant] = {}
    for start, end in rule_literals(source, config["statements"], config["functions"]):
        text = source[start:end]
        for offset, length, replacement in _text_mutants(text, whole_is_clause=_is_bare_condition(source, start,
                                                                                                     config)):
            a, b = start + offset, start + offset + length
            key = (a, b, replacement)
            if key not in found:
                found[key] = Mutant(store, source.count("\n", 0, a) + 1, a, b, replacement, source[a:b])
    return sorted(found.values(), key=lambda m: (m.start, m.end, m.replacement))


def _is_bare_condition(source: str, start: int, config) -> bool:
    """_BY_ID and the like: a string that is itself a list of conditions (no WHERE)."""
    line = source[source.rfind("\n", 0, start) + 1:start]
    return bool(re.match(r"\s*_BY_\w+\s*=\s*$", line))


def _text_mutants(text: str, whole_is_clause: bool):
    """(offset, length, replacement) of every mutant of one literal's text."""
    set_spans = [(m.start("body"), m.end("body")) for m in SET_CLAUSE.finditer(text)]

    def in_set(position: int) -> bool:
        return any(a <= position < b for a, b in set_spans)

    # Comparisons moved by one (and equalities of money loosened).
    for match in COMPARISON.finditer(text):
        lhs, op, rhs = match.group("lhs", "op", "rhs")
        if in_set(match.start()) or not (MONEY.search(lhs) or MONEY.search(rhs)) or op == "<>":
            continue
        if lhs.upper() in {"AND", "OR", "NOT", "WHERE", "ON", "WHEN"}:
            continue
        span = (match.start(), match.end() - match.start())
        if op in NEIGHBOUR:
            yield *span, f"{lhs} {NEIGHBOUR[op]} {rhs}"
            yield *span, f"{lhs} {op} {rhs} + 1"
            yield *span, f"{lhs} {op} {rhs} - 1"
        elif re.search(r"units|amount", lhs) and re.search(r"units|amount", rhs):
            for other in ("<=", ">=", "<>"):
                yield *span, f"{lhs} {other} {rhs}"
    # Conditions dropped.
    for start, end in _conjuncts(text, whole_is_clause):
        condition = text[start:end]
        if condition.strip().lower() not in {"true", ""} and not in_set(start):
            yield start, end - start, "true"
    # NOT dropped.
    for match in re.finditer(r"\bNOT\s+", text):
        if not in_set(match.start()):
            yield match.start(), match.end() - match.start(), ""
    # IN lists: a value dropped, a status added.
    for match in IN_LIST.finditer(text):
        items = re.findall(r"'([A-Z_]+)'", match.group("items"))
        start, length = match.start("items"), match.end("items") - match.start("items")
        for drop in items if len(items) > 1 else []:
            yield start, length, ", ".join(f"'{v}'" for v in items if v != drop)
        if set(items) <= set(STATUSES):  # one status never paid, one already refunded
            for extra in (v for v in ("OPEN", "PARTIALLY_REFUNDED") if v not in items):
                yield start, length, ", ".join(f"'{v}'" for v in items + [extra])
    # Literals swapped for another of their kind.
    for match in LITERAL.finditer(text):
        value = match.group("value")
        family = next((f for f in FAMILIES if value in f), None)
        if family is None:
            continue
        alternatives = [v for v in family if v != value]
        if family is STATUSES:  # the nearest statuses: the ones a mistake would pick
            alternatives = [v for v in ("SETTLED", "SUCCESS", "REFUNDED", "PARTIALLY_REFUNDED", "OPEN")
                            if v != value][:2]
        for other in alternatives:
            yield match.start("value") - 1, len(value) + 2, f"'{other}'"


def _conjuncts(text: str, whole_is_clause: bool) -> list[tuple[int, int]]:
    """(start, end) of each top-level AND-condition of every WHERE/ON clause in `text`."""
    starts = [m.end() for m in CLAUSE_START.finditer(text)]
    if whole_is_clause:
        starts.append(1)  # after the opening quote
    spans = []
    for begin in starts:
        depth, position, piece = 0, begin, begin
        while position < len(text):
            char = text[position]
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth < 0:
                    break
            elif char in "\"" and position > begin:
                break
            elif depth == 0:
                if CLAUSE_END.match(text, position) and text[position - 1] in " \n(":
                    break
                if re.match(r"AND\b", text[position:position + 4]) and text[position - 1] in " \n":
                    spans.append(_trimmed(text, piece, position))
                    piece = position + 3
            position += 1
        spans.append(_trimmed(text, piece, position))
    return [s for s in spans if s[1] > s[0]]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


# --------------------------------------------------------------------------- running


def copy_project(destination: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "mutants", "__pycache__", ".hypothesis", ".pytest_cache",
                                    "*.db", "*.db-*", "demo", "bench-report*")
    for item in ROOT.iterdir():
        if ignore(str(ROOT), [item.name]):
            continue
        if item.is_dir():
            shutil.copytree(item, destination / item.name, ignore=ignore)
        else:
            shutil.copy2(item, destination / item.name)


@contextlib.contextmanager
def scratch_database():
    """A migrated PostgreSQL database that tests/integration/test_rule_boundaries_sql.py
    empties and reuses for every mutant (creating one per run would cost more than the tests)."""
    from service import db

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"refund_mutation_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        db.migrate(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_tests(tree: Path, selection: list[str], timeout: float, scratch: str) -> tuple[bool, str]:
    """(killed, the first failing test or the reason)."""
    # Only the plugins these tests use: loading every installed one (schemathesis...) costs
    # more CPU than most mutants' tests.
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "pytest_timeout",
               "-p", "_hypothesis_pytestplugin", *selection]
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "REFUND_TEST_PG_SCRATCH_URL": scratch,
                   "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    try:
        done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return True, f"timeout after {timeout:.0f} s"
    if done.returncode == 0:
        return False, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if failed:  # a test that ran out of time (pytest-timeout) is named as such: read it with care
        return True, failed.group(1) + (" (timeout)" if re.search(r"Failed: Timeout", done.stdout) else "")
    return True, f"pytest exit {done.returncode}: " + (done.stdout.strip().splitlines() or [""])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--store", choices=sorted(STORES), action="append", help="only this store (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one mutant's tests")
    parser.add_argument("--only", type=lambda text: {int(n) for n in text.split(",")},
                        help="only these mutants, by the numbers --list prints (e.g. 15,19)")
    args = parser.parse_args(argv)

    stores = args.store or sorted(STORES)
    mutants = [m for store in stores for m in mutants_of(store, (ROOT / STORES[store]["file"]).read_text())]
    numbered = list(enumerate(mutants, 1))
    if args.only:
        numbered = [(n, m) for n, m in numbered if n in args.only]
    if args.list:
        for number, mutant in numbered:
            print(f"{number:3d} {mutant.describe()}")
        print(f"{len(numbered)} of {len(mutants)} mutants")
        return 0

    started = time.monotonic()
    survivors, killed_by = [], {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the copy and the database
    with tempfile.TemporaryDirectory(prefix="sql-mutants-") as directory, scratch_database() as scratch:
        tree = Path(directory)
        copy_project(tree)
        for store in stores:  # the unmutated code must pass, or every mutant would look killed
            for selection in STORES[store]["tests"]:
                killed, reason = run_tests(tree, selection, args.timeout, scratch)
                if killed:
                    print(f"the tests fail without any mutant ({reason}); fix them first", file=sys.stderr)
                    return 2
        for number, mutant in numbered:
            path = tree / STORES[mutant.store]["file"]
            original = path.read_text()
            path.write_text(original[:mutant.start] + mutant.replacement + original[mutant.end:])
            try:
                reason = ""
                for selection in STORES[mutant.store]["tests"]:
                    killed, reason = run_tests(tree, selection, args.timeout, scratch)
                    if killed:
                        break
            finally:
                path.write_text(original)
            if killed:
                killed_by[mutant] = reason
                print(f"{number:3d} killed   {mutant.describe()}\n      by {reason}", flush=True)
            else:
                survivors.append(mutant)
                print(f"{number:3d} SURVIVED {mutant.describe()}", flush=True)
    minutes = (time.monotonic() - started) / 60
    tried = len(numbered)
    print(f"\nSQL rule conditions: {len(killed_by)}/{tried} mutants killed "
          f"({100 * len(killed_by) / max(1, tried):.1f}%), {len(survivors)} survived, {minutes:.1f} min")
    for mutant in survivors:
        print(f"  survived: {mutant.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
