"""``flexmoe mt <train|eval|translate|extract|throughput>``: the translation model's commands.
``flexmoe train``, ``flexmoe eval`` and ``flexmoe translate`` are the same commands."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": "train a translation model from a TOML run file",
    "eval": "chrF/BLEU per direction of a run or an extracted sub-network",
    "translate": "translate lines from a file or stdin",
    "extract": "save one language's sub-network of a task-routed model and check its scores",
    "throughput": "greedy decoding tokens/s over a sweep of batch sizes",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = ["usage: flexmoe mt <subcommand> [options]", "", "subcommands:"]
        lines += [f"  {name:<11} {help_}" for name, help_ in SUBCOMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if not argv or argv[0] not in ("-h", "--help"):
            raise SystemExit(2)
        return
    importlib.import_module(f"flexmoe.models.commands.{argv[0]}").main(argv[1:])
