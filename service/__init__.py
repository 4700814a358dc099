"""The refund service: domain rules, stores, gRPC API, refund-service and refund-admin."""

__version__ = "0.1.0"
