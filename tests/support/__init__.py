"""What the tests share, one module per job:

- `processes`: the one way to start our real processes (`Process.service`, `Process.edge`,
  `Process.relay`: free ports, logs in files, stop, SIGKILL and restart) and a `Gateway` of
  a service and an edge with a signing client;
- `http`: the one HTTP client (`http_request`, plain or TLS) and its asyncio twin for storms
  (`post`, `post_many`), both answering with a `Reply`;
- `keys`: the example merchant's key pair, generated keys, signing and the signed envelope;
- `data`: builders of fixtures.example.json-shaped documents, loaded through `refund-admin`,
  and small readers of the database (balances, refund counts);
- `postgres`: a PostgreSQL database of its own per test, skip-or-fail when PostgreSQL is
  missing (REFUND_REQUIRE_POSTGRES), a private cluster a test may crash;
- `answers`: the documented shape of the edge's answers, JSON log lines; `cards`: Luhn and the card-number scan;
  `ledger`: the ledger's invariants read from the database;
- `in_process`: the service inside the test process (its gRPC server on a loop thread),
  rich-error decoding, fake back ends, service and edge in one process; `events`: a private
  nats-server, WatchEvents consumers, stream readers; `tls`: a CA and certificates made in
  the test; `prometheus`: scraping and what the processes export; `openapi`: the OpenAPI
  checks; `hostile`: the seeded world of the hostile-input proofs; `storm_clients`: retrying
  clients.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The example merchant's key pair, the example load file and the endpoint as first published to merchants.
FIXTURES_DIR = ROOT / "tests" / "fixtures"
