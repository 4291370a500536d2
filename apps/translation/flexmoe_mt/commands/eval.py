"""flexmoe-mt eval --model RUN_OR_EXTRACTED_DIR: chrF and BLEU per direction on a split of the
run's corpus (or a TSV file); writes eval-<split>.json into the model directory."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe_mt.data.corpus import SPLITS


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt eval", description=__doc__)
    parser.add_argument("--model", required=True, help="a run directory or an extracted sub-network directory")
    parser.add_argument("--split", default="test", choices=SPLITS, help="corpus split (default: test)")
    parser.add_argument("--tsv", help="evaluate on this TSV file instead of the run's corpus")
    parser.add_argument("--limit", type=int, default=0, help="at most this many sentences (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    args = parser.parse_args(argv)
    from flexmoe_mt.compare import evaluate_model
    from flexmoe_mt.extraction import load_translation_model

    try:
        trained = load_translation_model(args.model)
    except FileNotFoundError as error:
        parser.error(str(error))
    scores = evaluate_model(trained, args.split, args.tsv, args.limit, args.batch_size, args.beam, progress=True)
    print(scores.table())
    name = "eval-tsv.json" if args.tsv else f"eval-{args.split}.json"
    (Path(args.model) / name).write_text(json.dumps(scores.to_dict(), indent=2))
