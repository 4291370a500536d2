"""``flexmoe checkpoint export SRC FILE``: a checkpoint's model as one safetensors file.

Checkpoints load at any world size as they are (``flexmoe.load_checkpoint``); this gives the
global tensors in one file, e.g. for a server that loads a single-process model.
"""

from __future__ import annotations

import argparse

from flexmoe.checkpoint import export_safetensors
from flexmoe.cli import CommandParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser("flexmoe checkpoint", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write the model's global tensors into one safetensors file")
    export.add_argument("src", help="checkpoint directory written by flexmoe.save_checkpoint")
    export.add_argument("file", help="the safetensors file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export_safetensors(args.src, args.file)
    except (ValueError, OSError) as error:
        raise SystemExit(f"flexmoe checkpoint export: {error}") from None
    print(f"{args.src} -> {args.file}")
    return 0
