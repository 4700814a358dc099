"""The refund gateway's wire vocabulary, shared by the service and the edge.

Everything a caller can see on the wire and both sides must agree on, and
nothing else (no rules, no storage): the response codes (`codes`), the error
model of the gRPC API (`status`: google.rpc.Status with an ErrorInfo of our
domain and an optional RefundDecline), the currencies' decimals
(`currencies`), the text formats of amounts and headers (`formats`) and
strict JSON (`strict_json`).
"""
