"""flexmoe checkpoint convert SRC DST --to-world-size N: reshard a checkpoint offline."""

from __future__ import annotations

import argparse

from flexmoe.checkpoint import CheckpointReader, convert_checkpoint
from flexmoe.cli import CommandParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser("flexmoe checkpoint", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    convert = actions.add_parser("convert", help="rewrite a checkpoint for another world size (no model needed)")
    convert.add_argument("src", help="checkpoint directory written by save_checkpoint")
    convert.add_argument("dst", help="new (or empty) directory for the converted checkpoint")
    convert.add_argument("--to-world-size", type=int, required=True, help="ranks that will load it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from_world_size = CheckpointReader(args.src).world_size
        convert_checkpoint(args.src, args.dst, args.to_world_size)
    except (ValueError, OSError) as error:
        raise SystemExit(f"flexmoe checkpoint convert: {error}") from None
    print(f"{args.src} (world size {from_world_size}) -> {args.dst} (world size {args.to_world_size})")
    return 0
