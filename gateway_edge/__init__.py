"""The merchant edge: signed HTTP/JSON `POST /direct/refund` in front of the gRPC RefundService.

- `gateway_edge.app`: the raw ASGI application (routing, body limits, envelope parsing).
- `gateway_edge.answers`: response code -> HTTP status, gRPC outcome -> answer, exact JSON rendering.
- `gateway_edge.server`: `refund-edge`, the process (uvicorn + httptools + uvloop).
- `gateway_edge.client`: `refund-client`, a merchant-side signing tool, and `RefundClient`, the same as a library.
- `gateway_edge.run_all`: starts refund-service and refund-edge together for development.
"""
