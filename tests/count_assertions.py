"""Count the assertions of the test suite, file by file, from the source (AST).

    python tests/count_assertions.py            # per file, then the totals
    python tests/count_assertions.py --total    # the total only

Run it before and after moving tests around: the total must not drop
(docs/testing.md records it). What counts as one assertion:

- an `assert` statement;
- a call of `pytest.raises`, `pytest.fail`, `pytest.warns` or
  `pytest.deprecated_call` (as `pytest.x(...)` or a bare `x(...)` imported from pytest);
- a call of any function or method whose name starts with `assert_` or `check_`
  (the suite's checking helpers, e.g. `check_answer`, `assert_no_card_data`, and
  mock's `assert_called_once_with`).

Each is counted once where it is written, not once per run: a parametrized test
or a helper called from many tests counts its assertions once. Every `.py` file
under tests/ is read (the tests and the support code they call); the totals are
given for test modules (`test_*.py`) and for the rest separately, because merging
two copies of a helper lowers the second number without weakening any test.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PYTEST_CHECKS = {"raises", "fail", "warns", "deprecated_call"}
HELPER_PREFIXES = ("assert_", "check_")


def _called_name(call: ast.Call) -> tuple[str | None, str | None]:
    """(owner, name) of the called function: ("pytest", "raises"), (None, "check_answer")."""
    func = call.func
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    return None, None


def count(source: str) -> dict[str, int]:
    """The assertions in one module's source, by kind."""
    tree = ast.parse(source)
    pytest_names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "pytest" for alias in node.names if alias.name in PYTEST_CHECKS}
    found = {"assert": 0, "pytest": 0, "helper": 0}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            found["assert"] += 1
        elif isinstance(node, ast.Call):
            owner, name = _called_name(node)
            if name is None:
                continue
            if (owner == "pytest" and name in PYTEST_CHECKS) or (owner is None and name in pytest_names):
                found["pytest"] += 1
            elif name.startswith(HELPER_PREFIXES):
                found["helper"] += 1
    return found


def count_tree(root: Path = TESTS) -> dict[str, dict[str, int]]:
    """{path relative to root: counts} for every .py file under root."""
    return {path.relative_to(root).as_posix(): count(path.read_text(encoding="utf-8"))
            for path in sorted(root.rglob("*.py")) if ".venv" not in path.parts}


def main(argv: list[str]) -> int:
    counts = count_tree()
    tests = {path: c for path, c in counts.items() if Path(path).name.startswith("test_")}
    support = {path: c for path, c in counts.items() if path not in tests}
    total_tests = sum(sum(c.values()) for c in tests.values())
    total_support = sum(sum(c.values()) for c in support.values())
    if "--total" not in argv:
        for path, c in counts.items():
            if sum(c.values()):
                print(f"{sum(c.values()):6d}  {path}  (assert {c['assert']}, pytest {c['pytest']}, "
                      f"helpers {c['helper']})")
    print(f"test modules: {total_tests} assertions in {len(tests)} files")
    print(f"support code: {total_support} assertions in {len(support)} files")
    print(f"total: {total_tests + total_support}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
