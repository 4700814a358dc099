"""The product as a package: a wheel built from the source (the gRPC code generated
by the build itself, never committed), installed into a fresh virtual environment
away from the source tree, runs the whole product: refund-admin migrates and loads
the demo, refund-service and refund-edge serve, and refund-client and the
`RefundClient` library get 0000 for signed refunds.

Slow (a wheel build and a fresh venv with every dependency): marked `slow`; CI
runs it. pip takes the dependencies from its index or its cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow

# What a clone has that a build must not rely on: the environment, caches, generated code.
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", ".hypothesis",
                                    ".pytest_cache", "demo", "*.db", "*.db-*", "*_pb2.py", "*_pb2.pyi",
                                    "*_pb2_grpc.py", "bench-report*")


def run(argv, *, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(word) for word in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


class Started:
    """An installed console script running in the background, its output in a file."""

    def __init__(self, argv, *, cwd: Path, env: dict, name: str):
        self.log = cwd / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([str(word) for word in argv], cwd=cwd, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (match := re.search(rf"{name} listening on (\S+)", self.log.read_text())):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.address = match.group(1)

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with the wheel built from a copy of the source (no generated code in it)."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    assert not list(source.rglob("*_pb2*.py")), "the copy must not carry generated code"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", work / "dist", source], cwd=work)
    wheels = list((work / "dist").glob("refund_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    shutil.rmtree(source)  # nothing of the source is left to import from
    run([sys.executable, "-m", "venv", work / "venv"], cwd=work)
    run([work / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheels[0]], cwd=work)
    return work / "venv" / "bin"


def clean_environment(**extra) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("PYTHON", "VIRTUAL_ENV", "REFUND_", "OTEL_"))}
    return {**environment, "PYTHONUNBUFFERED": "1", **extra}


def test_the_wheel_installs_a_working_product(installed, tmp_path):
    env = clean_environment(REFUND_DATABASE_URL=f"sqlite:///{tmp_path / 'refund.db'}")
    python = installed / "python"

    where = run([python, "-c", "import refund.v1.refund_pb2 as m, service, importlib.metadata as md; "
                 "print(m.__file__); print(service.__version__, md.version('refund-gateway'))"], cwd=tmp_path, env=env)
    module_path, versions = where.stdout.splitlines()
    assert module_path.startswith(str(installed.parent)), module_path  # the generated code came with the wheel
    version, installed_version = versions.split()
    assert version == installed_version  # one version, from one place

    run([installed / "refund-admin", "migrate"], cwd=tmp_path, env=env)  # the migrations came with the wheel
    demo = run([installed / "refund-admin", "demo", "--dir", tmp_path / "demo"], cwd=tmp_path, env=env)
    assert "4100001" in demo.stdout

    service = Started([installed / "refund-service", "--listen", "127.0.0.1:0"], cwd=tmp_path, env=env,
                      name="refund-service")
    try:
        edge = Started([installed / "refund-edge", "--listen", "127.0.0.1:0", "--grpc-target", service.address],
                       cwd=tmp_path, env=env, name="refund-edge")
        try:
            url = f"http://{edge.address}"
            key = tmp_path / "demo" / "demo-merchant.key.pem"
            refund = run([installed / "refund-client", "--url", url, "--key", key, "--merchant-id", "4000001",
                          "--order-id", "4100001", "--amount", "76.19"], cwd=tmp_path, env=env, timeout=60)
            status_line, body = refund.stdout.split("\n", 1)
            assert status_line == "HTTP 200 OK"
            assert json.loads(body)["responseCode"] == "0000"

            library = run([python, "-c", (
                "import sys; from gateway_edge.client import RefundClient\n"
                "client = RefundClient(sys.argv[1], merchant_id='4000001', key=sys.argv[2])\n"
                "answer = client.refund(order_id=4100002, amount='10.00')\n"
                "print(answer.status, answer.response_code, answer.json['transaction']['amount'])\n"
                "print(client.query(order_id=4100002).json['order']['status'])"), url, key],
                cwd=tmp_path, env=env, timeout=60)
            assert library.stdout.split() == ["200", "0000", "10.00", "PARTIALLY_REFUNDED"]
        finally:
            assert edge.stop() == 0, edge.log.read_text()
    finally:
        assert service.stop() == 0, service.log.read_text()
