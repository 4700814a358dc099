"""The use cases of the refund service, free of any transport.

Each takes plain values and a store (service/stores/port.py), applies the
rules of service/domain.py, and returns domain results or raises
domain.DomainError (whose code is the answer) or StoreUnavailable. The gRPC
servicer (service/grpc_api.py) and refund-admin only translate.

- refunds.py: refund an order, for an internal caller or a merchant's signed request;
- idempotency.py: run a merchant's request at most once per Idempotency-Key;
- orders.py: an order and its transactions;
- money.py: record a sale, pay a settlement.
"""
