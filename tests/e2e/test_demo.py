"""What a newcomer does: migrate, load the demo, start the service, paste the
printed gRPC refund command."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_grpc_command_printed_by_the_demo_refunds_a_demo_order(tmp_path, start_service):
    url = f"sqlite:///{tmp_path / 'refund.db'}"
    assert run([BIN / "refund-admin", "--database-url", url, "migrate"], tmp_path).returncode == 0
    demo = run([BIN / "refund-admin", "--database-url", url, "demo"], tmp_path)
    assert demo.returncode == 0, demo.stderr
    command = next(line.strip() for line in demo.stdout.splitlines() if "service.grpc_client refund" in line)
    service = start_service(url)

    args = shlex.split(command)
    args[args.index("refund"):args.index("refund")] = ["--target", service.address]
    refunded = run(args, tmp_path)
    assert refunded.returncode == 0, refunded.stdout + refunded.stderr
    reply = json.loads(refunded.stdout)
    assert reply["responseCode"] == "0000" and reply["transaction"]["type"] == "REFUND"

    again = run(args, tmp_path)
    answer = json.loads(again.stdout)
    assert (again.returncode, answer["reason"], answer["responseCode"]) == (1, "ALREADY_REFUNDED", "3003")
    assert answer["decline"]["transaction"]["id"] == reply["transaction"]["id"]
    assert re.search(r"refundable now: ", run([BIN / "refund-admin", "--database-url", url, "demo"], tmp_path).stdout)
