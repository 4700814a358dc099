"""The merchant-side and developer tools around the edge, as processes:
`refund-client`, the command `refund-admin demo` prints, the openssl + curl
recipe of docs/edge.md, and the `run_all` launcher behind `make run`."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from gateway_edge.client import AnswerNotGenuine, RefundClient
from tests.support import FIXTURES_DIR, ROOT
from tests.support.answers import check_answer
from tests.support.data import load_document
from tests.support.http import http_request
from tests.support.keys import EXAMPLE_KEY_PEM, EXAMPLE_PUB_PEM, example_key, generated_key, public_pem
from tests.support.processes import free_port

BIN = Path(sys.executable).parent


def example_fixtures() -> dict:
    return json.loads((FIXTURES_DIR / "fixtures.example.json").read_text())


def script(name: str) -> list[str]:
    """The installed console script (pyproject [project.scripts])."""
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: run pip install -e ."
    return [str(path)]


def run(argv: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT),
                          **kwargs)


@pytest.fixture
def edge(sqlite_url, start_service, start_edge):
    load_document(sqlite_url, example_fixtures())
    return start_edge(start_service(sqlite_url).address)


def _answer(stdout: str) -> tuple[str, dict]:
    status_line, body = stdout.split("\n", 1)
    return status_line, json.loads(body)


# -- refund-client ------------------------------------------------------------------


def test_refund_client_signs_sends_and_prints_the_answer(edge):
    base = [*script("refund-client"), "--url", edge.url, "--key", str(EXAMPLE_KEY_PEM), "--merchant-id", "3000001"]

    done = run([*base, "--order-id", "1076", "--amount", "76.19"])
    assert done.returncode == 0, done.stderr
    status_line, body = _answer(done.stdout)
    assert status_line == "HTTP 200 OK"
    assert body["responseCode"] == "0000" and '"amount":76.19' in done.stdout

    again = run([*base, "--merchant-reference", "s22tring", "--amount", "76.19", "--double-base64"])
    assert again.returncode == 1
    assert _answer(again.stdout)[1]["responseCode"] == "3003"

    jpy = run([*base, "--order-id", "1079", "--merchant-reference", "jp-0001", "--amount", "4800",
               "--double-base64", "--url", edge.url + "/direct/refund"])
    assert jpy.returncode == 0 and '"amount":4800,' in jpy.stdout

    bad_amount = run([*base, "--order-id", "1077", "--amount", "0"])
    assert bad_amount.returncode == 1
    assert _answer(bad_amount.stdout) == ("HTTP 400 Bad Request", {
        "responseCode": "1002", "message": "INVALID_AMOUNT", "detail": "amount must be greater than zero"})


def test_refund_client_writes_the_amount_verbatim_and_its_signature_verifies(tmp_path):
    done = run([*script("refund-client"), "--key", str(EXAMPLE_KEY_PEM), "--merchant-id", "3000001",
                "--order-id", "1080", "--amount", "1.250", "--dry-run"])
    assert done.returncode == 0, done.stderr
    envelope = json.loads(done.stdout)
    assert envelope["request"] == '{"merchantId":"3000001","orderId":1080,"amount":1.250}'
    public = serialization.load_pem_public_key(EXAMPLE_PUB_PEM.read_bytes())
    public.verify(base64.b64decode(envelope["signature"], validate=True), envelope["request"].encode(),
                  padding.PKCS1v15(), hashes.SHA256())


def test_refund_client_refuses_bad_input_and_says_when_nobody_answers():
    base = [*script("refund-client"), "--key", str(EXAMPLE_KEY_PEM), "--merchant-id", "3000001"]
    for extra in (["--order-id", "1076", "--amount", "76.1.9"], ["--order-id", "1076", "--amount", "NaN"],
                  ["--order-id", "10x", "--amount", "1"], ["--amount", "1"]):
        done = run([*base, *extra])
        assert done.returncode == 2 and "usage:" in done.stderr, (extra, done.stderr)
    down = run([*base, "--order-id", "1076", "--amount", "1", "--url", f"http://127.0.0.1:{free_port()}"])
    assert down.returncode == 2 and "no answer from" in down.stderr


def test_the_command_refund_admin_demo_prints_is_a_working_refund(sqlite_url, start_service, start_edge, tmp_path):
    done = run([*script("refund-admin"), "--database-url", sqlite_url, "demo", "--dir", str(tmp_path / "demo")],
               cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines() if "refund-client" in line]
    argv = next(words for words in commands if Path(words[0]).name == "refund-client")
    edge = start_edge(start_service(sqlite_url).address)
    refund = run([*argv, "--url", edge.url], cwd=tmp_path)  # exactly as printed, pointed at this edge
    assert refund.returncode == 0, refund.stdout + refund.stderr
    assert _answer(refund.stdout)[1]["responseCode"] == "0000"


def test_refund_client_library_refunds_queries_and_checks_the_gateway_signature(sqlite_url, start_service,
                                                                                 start_edge, tmp_path):
    load_document(sqlite_url, example_fixtures())
    gateway_key = generated_key("gateway")
    key_path, public_path, other_path = tmp_path / "gateway.key.pem", tmp_path / "gateway.pub.pem", tmp_path / "x.pem"
    key_path.write_bytes(gateway_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    public_path.write_text(public_pem(gateway_key))
    other_path.write_text(public_pem(generated_key("not the gateway")))
    edge = start_edge(start_service(sqlite_url).address, "--signing-key", str(key_path))
    client = RefundClient(edge.url, merchant_id=3000001, key=str(EXAMPLE_KEY_PEM), gateway_public_key=public_path)

    first = client.refund(order_id=1076, amount=Decimal("76.19"), idempotency_key="library-1")
    assert (first.status, first.response_code) == (200, "0000")
    assert first.json["transaction"]["amount"] == Decimal("76.19") and first.request_id
    again = client.refund(order_id=1076, amount="76.19", idempotency_key="library-1")
    assert again.body == first.body  # the stored answer, byte for byte
    declined = client.refund(merchant_reference="s22tring", amount="76.19")
    assert (declined.status, declined.response_code) == (200, "3003")
    order = client.query(merchant_reference="s22tring", timestamp=True).json
    assert order["order"]["status"] == "REFUNDED" and [t["type"] for t in order["transactions"]] == ["SALE", "REFUND"]

    with pytest.raises(TypeError, match="never a float"):
        client.refund(order_id=1077, amount=76.19)
    with pytest.raises(ValueError, match="order_id or merchant_reference"):
        client.refund(amount="1.00")
    impostor_check = RefundClient(edge.url, merchant_id="3000001", key=example_key(), gateway_public_key=other_path)
    with pytest.raises(AnswerNotGenuine):
        impostor_check.query(order_id=1076)


# -- the openssl + curl recipe of docs/edge.md ------------------------------------------


def documented_recipe() -> str:
    text = (ROOT / "docs" / "edge.md").read_text()
    match = re.search(r"<!-- tested: .*?-->\n```sh\n(.*?)```\n<!-- end tested -->", text, re.S)
    assert match, "the tested block of docs/edge.md is missing"
    return match.group(1)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl and openssl")
def test_the_documented_openssl_and_curl_recipe_refunds_after_make_run(start_service, start_edge, tmp_path):
    """What `make run` does (migrate, demo, in the working directory), then the block exactly as
    documented, run in that directory; only EDGE is set, to this test's edge instead of port 8080."""
    for command in (["migrate"], ["demo"]):
        done = run([*script("refund-admin"), *command], cwd=tmp_path,
                   env={**os.environ, "REFUND_DATABASE_URL": "sqlite:///refund.db"})
        assert done.returncode == 0, done.stdout + done.stderr
    edge = start_edge(start_service(f"sqlite:///{tmp_path / 'refund.db'}").address)
    environment = {key: value for key, value in os.environ.items() if key not in ("KEY", "REQ", "SIG", "BODY")}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_recipe()], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path, env={**environment, "EDGE": edge.url})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["responseCode"] == "0000", answer
    assert answer["order"]["id"] == 4100003 and answer["transaction"]["merchantId"] == 4000001
    print(done.stdout)


# -- run_all: the launcher behind `make run` -------------------------------------------------


class Launcher:
    def __init__(self, database_url: str):
        self.log_path = Path(tempfile.mkstemp(prefix="run-all-", suffix=".log")[1])
        environment = {**os.environ, "REFUND_DATABASE_URL": database_url, "REFUND_GRPC_LISTEN": "127.0.0.1:0",
                       "REFUND_HTTP_LISTEN": "127.0.0.1:0", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway_edge.run_all"], env=environment,
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not re.search(r"Ctrl-C stops both", self.output()):
            assert self.process.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)
        self.edge_address = re.search(r"refund-edge listening on (\S+)", self.output()).group(1)
        self.children = [int(pid) for pid in
                         Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()]
        assert len(self.children) == 2

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self, pid: int) -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        return "\nState:\tZ" not in status

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.children:
            if self.alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def launcher(sqlite_url):
    load_document(sqlite_url, example_fixtures())
    started = []

    def start() -> Launcher:
        started.append(Launcher(sqlite_url))
        return started[-1]

    yield start
    for item in started:
        item.close()


def test_run_all_starts_service_and_edge_and_ctrl_c_stops_both(launcher):
    gateway = launcher()
    host, port = gateway.edge_address.rsplit(":", 1)
    from tests.support.keys import example_key, signed_body

    reply = http_request(host, int(port), "POST", "/direct/refund",
                         signed_body(example_key(), '{"merchantId":"3000001","orderId":1076,"amount":76.19}'),
                         {"Content-Type": "application/json"})
    check_answer(reply, "0000", 200)
    assert re.search(r"^\[service\] \{.*refund-service listening on", gateway.output(), re.MULTILINE)
    for line in gateway.output().splitlines():  # what the processes print is JSON, line by line
        if line.startswith(("[service] ", "[edge] ")):
            assert isinstance(json.loads(line.split("] ", 1)[1]), dict), line

    gateway.process.send_signal(signal.SIGINT)
    assert gateway.process.wait(20) == 0, gateway.output()
    assert not any(gateway.alive(pid) for pid in gateway.children)
    assert "SIGINT: stopping both" in gateway.output()


def test_run_all_stops_both_when_its_terminal_goes_away(launcher):
    gateway = launcher()
    gateway.process.send_signal(signal.SIGHUP)
    assert gateway.process.wait(20) == 0, gateway.output()
    assert not any(gateway.alive(pid) for pid in gateway.children)
    assert "SIGTERM: stopping both" in gateway.output()


def test_run_all_exits_when_either_process_dies_and_stops_the_other(launcher):
    gateway = launcher()
    service_pid, edge_pid = gateway.children
    os.kill(service_pid, signal.SIGKILL)
    assert gateway.process.wait(20) != 0
    assert not gateway.alive(edge_pid)
    assert "service exited with status -9; stopping the other" in gateway.output()
