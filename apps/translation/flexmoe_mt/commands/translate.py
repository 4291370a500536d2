"""flexmoe-mt translate --model DIR --to fr [--from en] [FILE]: translate each line of FILE (or
of stdin, interactively) into the target language.

    echo "January 3, 2024" | flexmoe-mt translate --model runs/demo/task_moe --to de

The models of this application know the phrases of their corpus (the embedded CLDR corpus:
numbers, dates, times, units, amounts of money, names of languages, countries, months and days),
not free text."""

from __future__ import annotations

import sys

from flexmoe.cli import CommandParser


def direction_error(trained, target_lang: str, source_lang: str) -> str | None:
    """Why the model cannot translate source_lang -> target_lang (one line naming the option, the
    accepted values and the fix), or None when it can."""
    targets = trained.tasks.target_languages
    if target_lang not in targets:
        return f"--to {target_lang}: the model translates into {', '.join(targets)}; pass one of these codes"
    if trained.task is None:
        return None
    served_source, _, served_target = trained.task.rpartition("-")
    if target_lang != served_target:
        return (
            f"--to {target_lang}: this sub-network serves only {served_target} (extracted with --task "
            f"{trained.task}); use --to {served_target}, or --model on the full run directory for other languages"
        )
    if served_source and source_lang != served_source:
        return (
            f"--from {source_lang}: this sub-network serves only {served_source} -> {served_target}; "
            f"use --from {served_source}, or --model on the full run directory for other directions"
        )
    return None


def main(argv: list[str]) -> None:
    parser = CommandParser("flexmoe-mt translate", description=__doc__)
    parser.add_argument("--model", required=True, help="a run directory or an extracted sub-network directory")
    parser.add_argument("--to", dest="target_lang", required=True, help="target language code, e.g. fr")
    parser.add_argument("--from", dest="source_lang", default="en", help="source language code (default en)")
    parser.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    parser.add_argument("file", nargs="?", help="input text, one sentence a line (default: stdin)")
    args = parser.parse_args(argv)
    from flexmoe_mt.data.corpus import Pair
    from flexmoe_mt.evaluate import translate_pairs
    from flexmoe_mt.extraction import load_translation_model

    try:
        trained = load_translation_model(args.model)
    except FileNotFoundError as error:
        parser.error(str(error))
    error = direction_error(trained, args.target_lang, args.source_lang)
    if error:
        parser.error(error)  # before reading any input
    handle = open(args.file, encoding="utf-8") if args.file else sys.stdin
    interactive = handle.isatty()
    try:
        if interactive:
            print(f"type a sentence to translate into {args.target_lang} (ctrl-D to quit)", file=sys.stderr)
        for line in handle:
            text = line.strip()
            if not text:
                continue
            pair = Pair(text, "", args.source_lang, args.target_lang)
            model, tokenizer, tasks = trained.model, trained.tokenizer, trained.tasks
            [translation] = translate_pairs(model, tokenizer, tasks, [pair], beam_size=args.beam)
            print(translation, flush=True)
    finally:
        if args.file:
            handle.close()
