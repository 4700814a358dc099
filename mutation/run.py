"""`make mutation`: mutation testing of the refund rules, start to finish.

1. service/domain.py with mutmut (pinned in pyproject.toml's `mutation` extra;
   its settings, including which tests run, are pyproject.toml's [tool.mutmut]).
   Each run starts afresh (mutants/ is removed first) so the score is of this code.
2. The stores' SQL rule conditions with mutation/sql.py.

Prints each part's score and every mutant that survived (with its diff); the
explanation of each known survivor is in docs/testing.md. Exit status 0 when
both parts ran, whatever the score: the score is read, not gated.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mutation import sql

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).parent / "mutmut"
LOG = ROOT / "mutants" / "mutmut-run.log"


def run_mutmut() -> int:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    (ROOT / "mutants").mkdir()
    started = time.monotonic()
    with open(LOG, "w") as log:  # mutmut's progress line is for a terminal; keep it out of the summary
        done = subprocess.run([str(MUTMUT), "run"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.monotonic() - started) / 60
    if done.returncode != 0:
        print(f"mutmut run failed (exit {done.returncode}); its output is in {LOG}")
        return done.returncode
    results = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True)
    status = dict(re.findall(r"^\s*(\S+): (.+)$", results.stdout, re.M))
    counts = Counter(status.values())
    checked = sum(counts.values()) - counts["not checked"] - counts["skipped"]
    detected = counts["killed"] + counts["timeout"]  # mutmut's own count: a mutant that hangs the tests is caught
    print(f"\nservice/domain.py (mutmut): {detected}/{checked} mutants killed or timed out "
          f"({100 * detected / max(1, checked):.1f}%), {minutes:.1f} min; "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "killed"))
    for name, state in sorted(status.items()):
        if state == "killed":
            continue
        diff = subprocess.run([str(MUTMUT), "show", name], cwd=ROOT, capture_output=True, text=True).stdout
        changed = [line for line in diff.splitlines() if re.match(r"^[-+](?![-+])", line)]
        print(f"  {state}: {name}")
        for line in changed:
            print(f"      {line.strip()}")
    return 0


def main() -> int:
    print("== service/domain.py: mutmut", flush=True)
    status = run_mutmut()
    print("\n== the stores' SQL rule conditions: mutation/sql.py", flush=True)
    return status or sql.main([])


if __name__ == "__main__":
    sys.exit(main())
