"""The ``flexmoe`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexmoe", description="flexmoe command line")
    sub = parser.add_subparsers(dest="command", required=True)
    hello = sub.add_parser("helloworld", help="train one MoE layer on synthetic data", add_help=False)
    hello.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "helloworld":
        from flexmoe.examples import helloworld

        helloworld.main(args.rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
