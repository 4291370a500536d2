"""``flexmoe checkpoint export SRC FILE``: a checkpoint's model as one safetensors file.

Checkpoints load at any world size as they are (``flexmoe.load_checkpoint``); this gives the
global tensors in one file, e.g. for a server that loads a single-process model.
"""

from __future__ import annotations

from flexmoe.checkpoint import export_safetensors
from flexmoe.cli import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser("flexmoe checkpoint", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write the model's global tensors into one safetensors file")
    export.add_argument("src", help="checkpoint directory written by flexmoe.save_checkpoint")
    export.add_argument("file", help="the safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        export_safetensors(args.src, args.file)
    except (ValueError, OSError) as error:
        parser.error(f"export: {error}")  # one line, exit status 2
    print(f"{args.src} -> {args.file}")
    return 0
