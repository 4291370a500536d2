"""The ``flexmoe`` command line: ``flexmoe <command> [options]``; ``flexmoe <command> -h`` for help."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "helloworld": ("flexmoe.examples.helloworld", "train one MoE layer on synthetic data"),
    "checkpoint": ("flexmoe.checkpoint_cli", "export a checkpoint's model as one safetensors file"),
    "extract": ("flexmoe.commands.extract", "save one task's sub-network (task-routed layers made dense)"),
    "infer": ("flexmoe.commands.infer", "run mixed-task inputs through per-task sub-networks"),
    "mt": ("flexmoe.models.commands", "translation model: mt train|eval|translate|extract|throughput"),
    "train": ("flexmoe.models.commands.train", "train a translation model (flexmoe train --config FILE)"),
    "eval": ("flexmoe.models.commands.eval", "score a translation model: chrF and BLEU per direction"),
    "translate": ("flexmoe.models.commands.translate", "translate lines with a trained model"),
}


def run_command(prog: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """``prog <command> [options]``: import the command's module and call its ``main(options)``.
    No command: usage on stderr, status 2; ``-h``: usage on stdout, 0; an unknown command: an
    error naming it, then the usage, on stderr, 2. ``flexmoe`` and ``flexmoe mt`` both use it."""
    usage = [f"usage: {prog} <command> [options]", "", "commands:"]
    usage = "\n".join(usage + [f"  {name:<12} {help_}" for name, (_, help_) in commands.items()])
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in commands:
        unknown = f"{prog}: unknown command {argv[0]!r}\n\n" if argv else ""
        print(unknown + usage, file=sys.stderr)
        return 2
    importlib.import_module(commands[argv[0]][0]).main(argv[1:])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("flexmoe", COMMANDS, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
