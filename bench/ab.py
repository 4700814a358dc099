"""Compare versions of the code on this noisy machine: each version in its own
tree, on the same data, alternated round after round (A, B, A, B, ... with the
order rotated each round), medians of the rounds, and each version's rate as a
ratio of the first's.

    .venv/bin/python -m bench.ab main HEAD                      # two commits (signed PostgreSQL and gRPC)
    .venv/bin/python -m bench.ab /tmp/before . --rounds 3 --modes edge-postgres,grpc-postgres,edge-sqlite

A version is a directory holding a tree of the project, or a commit (anything
`git rev-parse` knows): a commit is checked out into a temporary worktree (removed
at the end) and its protos generated there. Each version runs its own
`refund-service`, `refund-edge` and `refund-admin` (the entry points its own
pyproject.toml names, PYTHONPATH set to its tree) on databases of its own,
migrated and loaded by its own `refund-admin` with the same merchants and orders.
Each round starts the processes of each version, warms them up and runs each mode
for `--duration` seconds on orders no other run touches. Extra environment for a
version: AB_ENV_<its tree's directory name> as JSON, e.g.
AB_ENV_before='{"REFUND_LOG_LEVEL": "warning"}'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import edge_run, grpc_loadgen, json_result, measure, prepare_grpc_client, show, wrk, wrk_result
from bench.processes import Postgres, start_edge, start_service
from bench.workload import ROOT, Layout, load_document, log, make_keys, prepare_database, settle_database, sign_bodies


@dataclass
class Version:
    name: str  # as given on the command line
    tree: Path
    worktree: bool = False  # a temporary git worktree of ours, removed at the end
    urls: dict[str, str] = field(default_factory=dict)
    pg: Postgres | None = None

    @property
    def env(self) -> dict:
        return {"PYTHONPATH": f"{self.tree}:{self.tree}/gen",
                **json.loads(os.environ.get(f"AB_ENV_{self.tree.name}", "{}"))}

    def command(self, script: str) -> list[str]:
        """argv running one of the tree's own entry points (`refund-service`, ...) with this Python."""
        scripts = tomllib.loads((self.tree / "pyproject.toml").read_text())["project"]["scripts"]
        module, function = scripts[script].split(":")
        return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def checkout(name: str, work: Path) -> Version:
    """A directory as it is, or a commit in a worktree of its own with its protos generated."""
    if Path(name).is_dir():
        return Version(name, Path(name).resolve())
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{name}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise SystemExit(f"bench.ab: {name!r} is neither a directory nor a commit")
    tree = work / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit.stdout.strip()], cwd=ROOT, check=True,
                   capture_output=True)
    protos = sorted(str(p.relative_to(tree / "protos")) for p in (tree / "protos").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=gen",
                    "--grpc_python_out=gen", *[f"protos/{p}" for p in protos]], cwd=tree, check=True)
    return Version(name, tree, worktree=True)


def start(version: Version, db: str) -> tuple:
    env = {**version.env, "REFUND_EDGE_RATE_LIMIT": "off"}  # an edge without the setting ignores it
    service = start_service(version.urls[db], env, version.command("refund-service"), cwd=version.tree)
    try:
        edge = start_edge(service.address, env, version.command("refund-edge"), cwd=version.tree)
    except Exception:
        service.stop()
        raise
    return service, edge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="commits or directories; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--modes", default="edge-postgres,grpc-postgres",
                        help="comma-separated PATH-DATABASE[-storm]: edge or grpc, postgres or sqlite; "
                             "-storm: every refund on one merchant")
    parser.add_argument("--pg-url", default=os.environ.get("REFUND_BENCH_PG_URL",
                                                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args(argv)
    prepare_grpc_client()
    modes = [tuple(m.split("-")) for m in args.modes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="refund-ab-"))
    versions: list[Version] = []
    try:
        versions += [checkout(name, work) for name in args.versions]
        results = compare(args, modes, versions, work)
    finally:
        for version in versions:
            if version.pg is not None:
                version.pg.drop()
            if version.worktree:
                subprocess.run(["git", "worktree", "remove", "--force", str(version.tree)], cwd=ROOT,
                               capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    summary(modes, versions, results)
    return 0


def compare(args, modes, versions: list[Version], work: Path) -> dict:
    layout = Layout()
    runs = {(r, t, m): layout.add(f"{r}-{t}-{'-'.join(m)}", int(args.duration * (1800 if m[0] == "edge" else 2500)),
                                  m[0] == "edge", storm=m[2:] == ("storm",))
            for r in range(args.rounds) for t in range(len(versions)) for m in modes}
    warm = {(r, t): (layout.add(f"warm-edge-{r}-{t}", 1500, True), layout.add(f"warm-grpc-{r}-{t}", 1500, False))
            for r in range(args.rounds) for t in range(len(versions))}  # fresh orders: warm the approvals
    private, public = make_keys()
    bodies = sign_bodies(private, [s for s in layout.slices.values() if s.signed], work)
    document = work / "load.json"
    document.write_text(json.dumps(load_document(public, list(layout.slices.values()))))
    for t, version in enumerate(versions):
        for db in {mode[1] for mode in modes}:
            if db == "postgres":
                version.pg = Postgres(args.pg_url)
                version.urls[db] = version.pg.url
            else:
                version.urls[db] = f"sqlite:///{work / f'refund-{t}.db'}"
            loader = prepare_database(version.urls[db], document, version.command("refund-admin"), version.tree,
                                      version.env)
            if loader.wait() != 0:
                raise RuntimeError(f"{version.name}: refund-admin could not load the data")
            settle_database(version.urls[db])
    results: dict = {}
    for r in range(args.rounds):
        order = list(enumerate(versions))
        order = order[r % len(order):] + order[:r % len(order)]
        for t, version in order:
            for db in version.urls:
                service, edge = start(version, db)
                try:
                    wrk_result(wrk(edge.address, bodies[warm[(r, t)][0].name], 8, 2))
                    json_result(grpc_loadgen([service.address], warm[(r, t)][1], 8, 1.5))
                    for mode in modes:
                        if mode[1] != db:
                            continue
                        piece = runs[(r, t, mode)]
                        pg = version.pg if db == "postgres" else None
                        if mode[0] == "edge":
                            result = measure("edge", lambda: edge_run([edge], bodies[piece.name], args.connections,
                                                                      args.duration),
                                             {"edge": [edge], "service": [service]}, pg)
                        else:
                            result = measure("grpc", lambda: [json_result(grpc_loadgen(
                                [service.address], piece, args.connections, args.duration))],
                                {"service": [service]}, pg)
                        results.setdefault((t, mode), []).append(result)
                        log(f"round {r} {version.name} {'-'.join(mode)}: {show(result)}")
                finally:
                    edge.stop()
                    service.stop()
    return results


def summary(modes, versions: list[Version], results: dict) -> None:
    print("\nmedians of the rounds")
    for mode in modes:
        base = None
        for t, version in enumerate(versions):
            done = results.get((t, mode), [])
            if not done:
                continue
            rate = statistics.median(x["rate"] for x in done)
            base = base or rate
            cpu = " ".join(f"{k}={statistics.median(x['cpu_us'][k] for x in done):.0f}" for k in done[0]["cpu_us"])
            print(f"{'-'.join(mode):14} {version.name:12} {rate:6.0f}/s ({rate / base:.2f}x)  "
                  f"p99 {statistics.median(x['p99_ms'] for x in done):6.1f} ms  CPU us/refund: {cpu}  "
                  f"total={statistics.median(x['cpu_total_us'] for x in done):.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
