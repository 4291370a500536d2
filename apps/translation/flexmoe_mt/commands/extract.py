"""flexmoe-mt extract --model RUN --task fr [--out DIR]: the sub-network serving one target
language (--task en-fr when a stack is routed by language pair), saved with safetensors and
evaluated against the full model on that language's test sentences."""

from __future__ import annotations

from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe_mt.data.corpus import SPLITS


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt extract", description=__doc__)
    parser.add_argument("--model", required=True, help="a run directory (checkpoint.pt)")
    parser.add_argument("--task", required=True, help="target language (fr) or direction (en-fr)")
    parser.add_argument("--out", help="output directory (default: RUN/extract-TASK)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to compare scores on (default: test)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many sentences (0: all)")
    args = parser.parse_args(argv)
    from flexmoe_mt.compare import compare_extracted
    from flexmoe_mt.extraction import extract_direction, save_extracted
    from flexmoe_mt.train import load_trained

    source_lang, _, target_lang = args.task.rpartition("-")
    try:
        trained = load_trained(args.model)
    except FileNotFoundError as error:
        parser.error(str(error))
    try:
        extracted = extract_direction(trained.model, trained.tasks, target_lang, source_lang or None)
    except ValueError as error:
        parser.error(f"--task {args.task}: {error}")
    out = save_extracted(extracted, trained, args.out or Path(args.model) / f"extract-{args.task}", args.task)
    print(f"saved {out}")
    print(compare_extracted(trained, out, args.split, args.limit, progress=True))
