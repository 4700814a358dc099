"""gateway_edge.limits.OneSendPerTick: what the edge writes within one turn of
the event loop (a response's head and body) leaves in one send, in order, and
closing never loses or reorders what was written before it."""

from __future__ import annotations

import asyncio

from gateway_edge.limits import OneSendPerTick


class FakeTransport:
    def __init__(self):
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def write_eof(self) -> None:
        self.events.append("eof")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.events.append(f"close after {len(self.sent)} sends")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def get_extra_info(self, name):
        return f"extra {name}"


def run(scenario):
    async def main():
        transport = FakeTransport()
        await scenario(OneSendPerTick(transport, asyncio.get_running_loop()))
        await asyncio.sleep(0)  # one more turn: anything still held is sent
        return transport

    return asyncio.run(main())


def test_a_head_and_a_body_written_in_one_turn_leave_in_one_send_and_the_next_response_in_another():
    async def scenario(transport):
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.writelines([b"{", b"}"])
        await asyncio.sleep(0)
        transport.write(b"HTTP/1.1 404 Not Found\r\n\r\n")

    sent = run(scenario).sent
    assert sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"HTTP/1.1 404 Not Found\r\n\r\n"]


def test_close_and_eof_send_what_was_written_first():
    async def scenario(transport):
        transport.write(b"answer")
        transport.write_eof()
        transport.write(b"more")
        transport.close()

    transport = run(scenario)
    assert transport.sent == [b"answer", b"more"]
    assert transport.events == ["eof", "close after 2 sends"]


def test_abort_drops_what_is_held_and_nothing_is_written_to_a_closing_transport():
    async def scenario(transport):
        transport.write(b"held")
        transport.abort()
        transport.write(b"after abort")

    transport = run(scenario)
    assert transport.sent == []
    assert transport.events == ["abort"]


def test_anything_else_is_the_transports():
    async def scenario(transport):
        assert transport.get_extra_info("peername") == "extra peername"
        assert transport.is_closing() is False

    run(scenario)
