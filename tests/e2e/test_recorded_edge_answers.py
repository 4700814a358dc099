"""The edge answers a recorded set of requests byte for byte as it did when
they were recorded (issue 12: behaviour unchanged by the refactor).

tests/fixtures/edge_answers.json was recorded on main before the refactor by
`python -m tests.support.record_edge_answers`: the scenario of
tests/support/edge_answers_scenario.py (approvals, every decline, every refusal of the
envelope, the replay window, Idempotency-Key, paths and methods, queries, the
HTTP-200 mode) on a fresh SQLite and a fresh PostgreSQL database, through the
real processes. Here the same requests are sent again, in the same order, to
the current code, and every answer (status line, headers, body) must be the
recorded one; the normalisations (a pinned service clock, no `Date`, generated
request ids) are listed in tests/support/record_edge_answers.py.

If a change of behaviour is intended, record again and review the fixture's diff.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support import record_edge_answers as recorder

RECORDED = json.loads(recorder.DEFAULT_OUT.read_text())
# Every response code a merchant can provoke with the back end up; 9001, 9002 and
# 9999 need a failing back end or a rate limit, which other tests cover.
PROVOKED_CODES = {"0000", "1001", "1002", "1003", "2001", "2002", "2003", "3001", "3002", "3003", "4001", "4002",
                  "4003", "4004"}
HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 415, 431}


def _answered_codes(answers: list[dict]) -> set[str]:
    codes = set()
    for answer in answers:
        try:
            codes.add(json.loads(answer.get("body", ""))["responseCode"])
        except (ValueError, KeyError, TypeError):
            pass
    return codes


def test_the_recording_is_of_the_current_scenario():
    """The fixture's requests and data are what tests/support/edge_answers_scenario.py
    makes today (a scenario edited without recording again is noticed)."""
    current = recorder.scenario_document()
    for part in ("now", "edge_args", "admin_commands", "load"):
        assert RECORDED[part] == current[part], f"{part} differs from the scenario: record again"
    names = [request["name"] for request in current["requests"]]
    assert [request["name"] for request in RECORDED["requests"]] == names, "requests added, removed or renamed"
    for recorded, request in zip(RECORDED["requests"], current["requests"], strict=False):
        assert recorded == request, f"request {request['name']!r} differs from the scenario: record again"


def test_the_recording_covers_every_answer_a_merchant_can_provoke():
    answers = RECORDED["answers"]
    assert len(answers) == len(RECORDED["requests"]) >= 60
    assert _answered_codes(answers) == PROVOKED_CODES
    assert {int(answer["status"].split()[1]) for answer in answers} == HTTP_STATUSES
    refused_in_200_mode = [a for a in answers if a["name"].startswith("HTTP-200 mode") and "2001" in a["body"]]
    assert refused_in_200_mode and refused_in_200_mode[0]["status"] == "HTTP/1.1 200 OK"
    assert all(any(name == "x-signature" for name, _ in answer["headers"]) for answer in answers)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_edge_answers_every_recorded_request_byte_for_byte(kind):
    try:
        answers = recorder.run(kind, RECORDED)
    except recorder.DatabaseUnavailable as exc:
        if os.environ.get("REFUND_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{exc} (REFUND_REQUIRE_POSTGRES=1)")
        pytest.skip(str(exc))
    recorded = RECORDED["answers"]
    assert len(answers) == len(recorded)
    differing = [i for i, (old, new) in enumerate(zip(recorded, answers, strict=False)) if old != new]
    if differing:
        first = differing[0]
        pytest.fail(f"{len(differing)} of {len(recorded)} answers differ on {kind}; the first:\n"
                    + recorder.first_difference(first, RECORDED["requests"][first], recorded[first], answers[first]))

