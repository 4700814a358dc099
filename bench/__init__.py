"""`make bench`: the refund path under load (see docs/performance.md)."""
