"""The flexmoe command line: flexmoe <command> [options]; flexmoe <command> -h for help."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from flexmoe import __version__

# command -> (module with main(argv), one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "helloworld": ("flexmoe.examples.helloworld", "train one MoE layer on synthetic data"),
    "checkpoint": ("flexmoe.checkpoint_cli", "export a checkpoint's model as one safetensors file"),
    "extract": ("flexmoe.commands.extract", "save one task's sub-network (task-routed layers made dense)"),
    "infer": ("flexmoe.commands.infer", "run mixed-task inputs through per-task sub-networks"),
    "plan": ("flexmoe.planner.cli", "predict the layer's step time and best (r, d, all-to-all) on a cluster"),
}

# Commands of the translation application, which has its own program.
APPLICATION_COMMANDS = ("train", "eval", "translate", "throughput", "demo", "mt")
APPLICATION_HINT = (
    "the translation model's commands are in the flexmoe-mt program "
    "(pip install -e apps/translation; then flexmoe-mt -h)"
)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser for a flexmoe or flexmoe-mt command: the description (the module's
    docstring) is shown as written, and a usage error is one line on stderr with status 2."""

    def __init__(self, prog: str, description: str | None = None, **options) -> None:
        options.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **options)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} -h)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``minimum``, else a usage error naming the accepted values."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def ints_at_least(minimum: int) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated ints, each >= ``minimum`` (``"1,8,32"``), else a
    usage error naming the accepted values."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= {minimum} (e.g. 1,8,32), got {text!r}"
            )
        return values

    parse.__name__ = f"comma-separated integers >= {minimum}"
    return parse


def run_command(
    prog: str,
    commands: dict[str, tuple[str, str]],
    argv: list[str],
    version: str,
    footer: str = "",
    hints: dict[str, str] | None = None,
) -> int:
    """prog <command> [options]: import the command's module and call its main(options).

    No command: usage on stderr, status 2; -h: usage on stdout, 0; --version: the version, 0; an
    unknown command: one line naming it and the accepted commands on stderr, 2 (``hints`` maps a
    command that lives elsewhere to where it is). flexmoe and flexmoe-mt both use it."""
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in commands.items()]
    lines += ["", f"{prog} <command> -h shows a command's options; {prog} --version its version."]
    usage = "\n".join(lines + ([footer] if footer else []))
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv and argv[0] == "--version":
        print(f"{prog} {version}")
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] not in commands:
        hint = (hints or {}).get(argv[0]) or f"run {prog} -h for the list"
        print(f"{prog}: unknown command {argv[0]!r}: expected one of {', '.join(commands)}; {hint}", file=sys.stderr)
        return 2
    status = importlib.import_module(commands[argv[0]][0]).main(argv[1:])
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    hints = dict.fromkeys(APPLICATION_COMMANDS, APPLICATION_HINT)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("flexmoe", COMMANDS, argv, __version__, f"\n{APPLICATION_HINT}.", hints)


if __name__ == "__main__":
    sys.exit(main())
