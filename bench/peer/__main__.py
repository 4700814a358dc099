"""python -m bench.peer: set up, serve, sign for and drop the conventional peer (bench/peer/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio

from bench.bare_chain import workload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    workload.add_setup_arguments(commands.add_parser("setup", help="create the peer's database and load it"))
    serve = commands.add_parser("serve", help="the FastAPI app (prints 'peer listening on H:P')")
    serve.add_argument("--database-url", required=True)
    serve.add_argument("--listen", default="127.0.0.1:0")
    workload.add_sign_arguments(commands.add_parser("sign", help="signed envelopes for wrk (bench/refund.lua)"))
    drop = commands.add_parser("drop", help="drop the peer's database")
    drop.add_argument("--database-url", required=True)
    args = parser.parse_args(argv)

    if args.command == "setup":
        from bench.peer.data import setup

        public = workload.public_keys_for_setup(args)
        asyncio.run(workload.create_database(args.database_url))
        asyncio.run(setup(args.database_url, public, args.first_order, args.orders, workload.AMOUNT,
                          workload.BALANCE))
        print(f"peer: {args.orders} orders from {args.first_order}, {len(public)} merchants")
    elif args.command == "serve":
        from bench.peer.app import create_app

        workload.serve_asgi(create_app(args.database_url), args.listen, "peer")
    elif args.command == "sign":
        workload.sign(args.keys, args.first_order, args.count, args.out)
    else:
        asyncio.run(workload.drop_database(args.database_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
