"""flexmoe-mt throughput --model DIR [--model DIR ...]: greedy decoding tokens/s over a sweep
of batch sizes on the test sentences each model serves, and the peak."""

from __future__ import annotations

from flexmoe.cli import CommandParser, int_at_least, ints_at_least


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt throughput", description=__doc__)
    parser.add_argument("--model", action="append", required=True, help="run or extracted directory (repeatable)")
    parser.add_argument(
        "--batch-sizes",
        type=ints_at_least(1),
        default=[1, 8, 32, 128],
        help="comma-separated sweep (default 1,8,32,128)",
    )
    parser.add_argument("--task", help="decode only sentences into this target language (default: all)")
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    from flexmoe_mt.compare import throughput_table

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        table = throughput_table(args.model, args.batch_sizes, args.task)
    except (FileNotFoundError, ValueError) as error:  # a missing or damaged model, a --task it does not serve
        parser.error(str(error))
    print(table)
