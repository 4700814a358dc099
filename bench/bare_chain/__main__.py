"""python -m bench.bare_chain: set up, serve, sign for and drop the bare chain (bench/bare_chain/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio

import uvloop

from bench.bare_chain import workload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_chain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="create the chain's database and load it")
    workload.add_setup_arguments(setup)
    service = commands.add_parser("serve-service", help="the gRPC service (prints 'bare-service listening on H:P')")
    service.add_argument("--database-url", required=True)
    service.add_argument("--listen", default="127.0.0.1:0")
    edge = commands.add_parser("serve-edge", help="the HTTP edge (prints 'bare-edge listening on H:P')")
    edge.add_argument("--listen", default="127.0.0.1:0")
    edge.add_argument("--service", required=True, help="the service's HOST:PORT")
    workload.add_sign_arguments(commands.add_parser("sign", help="signed envelopes for wrk (bench/refund.lua)"))
    drop = commands.add_parser("drop", help="drop the chain's database")
    drop.add_argument("--database-url", required=True)
    args = parser.parse_args(argv)

    if args.command == "setup":
        from bench.bare_chain.service import setup as load

        public = workload.public_keys_for_setup(args)
        asyncio.run(workload.create_database(args.database_url))
        asyncio.run(load(args.database_url, public, args.first_order, args.orders, workload.AMOUNT,
                         workload.BALANCE))
        print(f"bare chain: {args.orders} orders from {args.first_order}, {len(public)} merchants")
    elif args.command == "serve-service":
        from bench.bare_chain.service import serve

        uvloop.run(serve(args.database_url, args.listen))
    elif args.command == "serve-edge":
        from bench.bare_chain.edge import serve

        serve(args.service, args.listen)
    elif args.command == "sign":
        workload.sign(args.keys, args.first_order, args.count, args.out)
    else:
        asyncio.run(workload.drop_database(args.database_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
