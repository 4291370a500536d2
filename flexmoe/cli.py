"""The ``flexmoe`` command line: ``flexmoe <command> [options]``; ``flexmoe <command> -h`` for help."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "helloworld": ("flexmoe.examples.helloworld", "train one MoE layer on synthetic data"),
    "checkpoint": ("flexmoe.checkpoint_cli", "convert a checkpoint to another world size"),
    "extract": ("flexmoe.commands.extract", "save one task's sub-network (task-routed layers made dense)"),
    "infer": ("flexmoe.commands.infer", "run mixed-task inputs through per-task sub-networks"),
    "mt": ("flexmoe.models.commands", "translation model: mt train|eval|translate|extract|throughput"),
    "train": ("flexmoe.models.commands.train", "train a translation model (flexmoe train --config FILE)"),
    "eval": ("flexmoe.models.commands.eval", "score a translation model: chrF and BLEU per direction"),
    "translate": ("flexmoe.models.commands.translate", "translate lines with a trained model"),
}


def _usage() -> str:
    lines = ["usage: flexmoe <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flexmoe: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
