"""``flexmoe translate --model DIR --to fr [--from en] [FILE]``: translate each line of FILE (or
of stdin, interactively) into the target language."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="flexmoe translate", description=__doc__)
    parser.add_argument("--model", required=True, help="a run directory or an extracted sub-network directory")
    parser.add_argument("--to", dest="target_lang", required=True, help="target language code, e.g. fr")
    parser.add_argument("--from", dest="source_lang", default="en", help="source language (langpair routing)")
    parser.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    parser.add_argument("file", nargs="?", help="input text, one sentence a line (default: stdin)")
    args = parser.parse_args(argv)
    from flexmoe.data.corpus import Pair
    from flexmoe.models.evaluate import translate_pairs
    from flexmoe.models.extraction import load_translation_model

    try:
        trained = load_translation_model(args.model)
    except FileNotFoundError as error:
        parser.error(str(error))
    trained.tasks.target_id(args.target_lang)  # a clear error before reading any input
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
