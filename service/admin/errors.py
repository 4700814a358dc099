"""How a refund-admin command fails: an AdminError carries the one line printed on
stderr and the exit status (the statuses are listed in service/admin/__init__.py)."""

from __future__ import annotations

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_DATABASE = 3
EXIT_DISCREPANCIES = 4

MAX_PROBLEMS_SHOWN = 50


class AdminError(Exception):
    """A command refused; its message is printed on stderr and nothing is written."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.exit_code = exit_code


class BadFile(AdminError):
    """A load file refused whole; one problem per bad entry."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        super().__init__("refused, nothing written:\n" + "\n".join("  " + p for p in shown), EXIT_BAD_INPUT)
        self.problems = problems
