"""flexmoe extract: save one task's sub-network (task-routed layers folded to dense blocks).

    flexmoe extract --model pkg.mod:factory [--model-kwargs JSON] [--checkpoint W.pt] --task 3 --out DIR

DIR gets model.safetensors and flexmoe_subnetwork.json (flexmoe.save_subnetwork);
load it back with flexmoe.load_subnetwork(DIR, factory).
"""

from __future__ import annotations

from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe.commands.model_source import add_model_arguments, load_model
from flexmoe.task import extract_task, save_subnetwork


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser("flexmoe extract", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--task", type=int, required=True, help="task id whose sub-network to extract")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the sub-network to")
    args = parser.parse_args(argv)
    try:
        sub = extract_task(load_model(args), args.task)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    save_subnetwork(sub, args.out)
    print(sub.extraction_report)
    print(f"saved to {args.out}")
    return 0
