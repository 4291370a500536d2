"""``flexmoe mt <train|eval|translate|extract|throughput>``: the translation model's commands.
``flexmoe train``, ``flexmoe eval`` and ``flexmoe translate`` are the same commands."""

from __future__ import annotations

# command -> (module with main(argv), one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    name: (f"flexmoe.models.commands.{name}", help_)
    for name, help_ in {
        "train": "train a translation model from a TOML run file",
        "eval": "chrF/BLEU per direction of a run or an extracted sub-network",
        "translate": "translate lines from a file or stdin",
        "extract": "save one language's sub-network of a task-routed model and check its scores",
        "throughput": "greedy decoding tokens/s over a sweep of batch sizes",
    }.items()
}


def main(argv: list[str]) -> None:
    from flexmoe.cli import run_command

    status = run_command("flexmoe mt", SUBCOMMANDS, argv)
    if status:
        raise SystemExit(status)
