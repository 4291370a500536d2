"""The flexmoe-mt command line: flexmoe-mt <command> [options]; flexmoe-mt <command> -h for help."""

from __future__ import annotations

import sys

from flexmoe.cli import run_command
from flexmoe_mt import __version__

# command -> (module with main(argv), one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flexmoe_mt.commands.train", "train a translation model from a TOML run file"),
    "eval": ("flexmoe_mt.commands.eval", "chrF/BLEU per direction of a run or an extracted sub-network"),
    "translate": ("flexmoe_mt.commands.translate", "translate lines from a file or stdin"),
    "extract": ("flexmoe_mt.commands.extract", "save one language's sub-network and compare its scores"),
    "throughput": ("flexmoe_mt.commands.throughput", "greedy decoding tokens/s over a sweep of batch sizes"),
    "demo": ("flexmoe_mt.demo", "corpus, task-MoE and dense trained side by side, extraction, scores"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("flexmoe-mt", COMMANDS, argv, __version__)


if __name__ == "__main__":
    sys.exit(main())
