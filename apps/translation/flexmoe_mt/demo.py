"""flexmoe-mt demo (make demo): build the corpus, train a task-MoE and a dense model for the same wall time,
evaluate both, extract one language's sub-network, and print scores, decoding throughput and
example translations.

    flexmoe-mt demo [--minutes 8] [--language fr] [--tsv-dir DIR] [--fresh]
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from flexmoe.cli import CommandParser
from flexmoe.task.extract import count_parameters
from flexmoe_mt.compare import served_pairs, throughputs
from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.evaluate import score, translate_pairs
from flexmoe_mt.extraction import extract_direction, load_translation_model, save_extracted
from flexmoe_mt.plots import read_metrics
from flexmoe_mt.runconfig import RunConfig, load_run_config
from flexmoe_mt.train import TrainedModel, load_corpus, load_trained, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BATCH_SIZES = [1, 16, 64]


def per_direction_sample(pairs: list[Pair], per_direction: int, seed: int = 0) -> list[Pair]:
    """``per_direction`` pairs of each direction, drawn at random (seeded) so every kind of phrase
    is represented (the corpus lists pairs kind by kind), kept in corpus order."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    taken: dict[tuple[str, str], int] = {}
    kept = []
    for index in order:
        key = (pairs[index].source_lang, pairs[index].target_lang)
        if taken.get(key, 0) < per_direction:
            taken[key] = taken.get(key, 0) + 1
            kept.append(index)
    return [pairs[index] for index in sorted(kept)]


def demo_config(name: str, minutes: float, tsv_dir: str | None) -> RunConfig:
    run = load_run_config(CONFIGS / f"{name}.toml")
    train_config = dataclasses.replace(run.train, max_minutes=minutes)
    data = run.data
    if tsv_dir:
        files = {split: str(Path(tsv_dir) / f"{split}.tsv") for split in ("train", "valid", "test")}
        data = dataclasses.replace(data, source="tsv", **files)
    return dataclasses.replace(run, data=data, train=train_config)


def _train_quietly(run: RunConfig) -> None:
    train(run, progress=False)


def train_side_by_side(runs: list[RunConfig]) -> None:
    """Train the runs in parallel processes (one core each: equal conditions, half the wall time);
    the first shows its progress bar."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_train_quietly, args=(run,)) for run in runs[1:]]
    for worker in workers:
        worker.start()
    try:
        train(runs[0])
    finally:
        for worker in workers:
            worker.join()
    failed = [run.train.run_dir for run, worker in zip(runs[1:], workers) if worker.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed for {failed}")


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser("flexmoe-mt demo", description=__doc__)
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes per model (default 8)")
    parser.add_argument("--language", default="fr", help="target language to extract (default fr)")
    parser.add_argument("--per-direction", type=int, default=25, help="test sentences per direction (default 25)")
    parser.add_argument("--tsv-dir", help="use DIR/{train,valid,test}.tsv instead of the embedded corpus")
    parser.add_argument("--fresh", action="store_true", help="retrain even if runs/demo holds finished runs")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runs = {name: demo_config(name, args.minutes, args.tsv_dir) for name in ("demo_task_moe", "demo_dense")}
    for run in runs.values():
        if args.fresh and Path(run.train.run_dir).exists():
            shutil.rmtree(run.train.run_dir)
    threads = runs["demo_task_moe"].train.threads or torch.get_num_threads()
    print(f"flexmoe demo: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")

    print("\n== corpus ==")
    corpus = load_corpus(runs["demo_task_moe"].data)
    print(f"{len(corpus['train']):,} training pairs, {len(corpus.target_languages)} target languages")
    if args.language not in corpus.target_languages:
        known = ", ".join(corpus.target_languages)
        parser.error(f"--language {args.language}: the corpus's target languages are {known}; pass one of them")
    print(f"\n== training task-MoE and dense side by side, {args.minutes:g} minutes each, one thread each ==")
    train_side_by_side(list(runs.values()))

    moe, dense = (load_trained(run.train.run_dir) for run in runs.values())
    language = args.language
    sub_network = extract_direction(moe.model, moe.tasks, language)
    extracted_dir = save_extracted(sub_network, moe, Path(moe.run.train.run_dir) / f"extract-{language}", language)
    extracted = load_translation_model(extracted_dir)  # reloaded from safetensors, as a server would

    test = per_direction_sample(corpus["test"], args.per_direction)
    into_language = served_pairs(extracted, test)
    print(f"\n== evaluation ({len(test)} test sentences, {args.per_direction} per direction) ==")
    rows, outputs = [], {}
    torch.set_num_threads(threads)
    speed_models = {
        f"dense, into {language}": dense,
        f"task-MoE, into {language}": moe,
        f"extracted {language}": extracted,
    }
    peaks = {name: max(sweep.values()) for name, sweep in throughputs(speed_models, into_language, BATCH_SIZES).items()}
    for name, model, pairs in (
        ("dense", dense, test),
        ("task-MoE", moe, test),
        (f"dense, into {language}", dense, into_language),
        (f"task-MoE, into {language}", moe, into_language),
        (f"extracted {language}", extracted, into_language),
    ):
        hypotheses = translate_pairs(model.model, model.tokenizer, model.tasks, pairs, progress=name)
        outputs[name] = hypotheses
        scores = score(pairs, hypotheses)
        rows.append((name, count_parameters(model.model), scores.mean_chrf, scores.mean_bleu, peaks.get(name)))

    steps = {
        "dense": read_metrics(dense.run.train.run_dir)[-1]["step"],
        "task-MoE": read_metrics(moe.run.train.run_dir)[-1]["step"],
    }
    print(f"\n{'model':<22} {'steps':>6} {'parameters':>10} {'chrF':>6} {'BLEU':>6} {'tokens/s':>9}")
    for name, parameters, chrf, bleu, peak in rows:
        speed = f"{peak:9.0f}" if peak else f"{'':>9}"
        trained_steps = steps.get(name.split(",")[0], "")
        print(f"{name:<22} {trained_steps:>6} {parameters:>10,} {chrf:6.1f} {bleu:6.1f} {speed}")
    same = sum(a == b for a, b in zip(outputs[f"task-MoE, into {language}"], outputs[f"extracted {language}"]))
    print(
        f"\nextracted vs full task-MoE into {language}: identical translations {same}/{len(into_language)}, "
        f"decoding throughput x{peaks[f'extracted {language}'] / peaks[f'task-MoE, into {language}']:.2f} "
        f"(vs dense x{peaks[f'extracted {language}'] / peaks[f'dense, into {language}']:.2f})"
    )
    print(
        f"both models trained {args.minutes:g} minutes of wall time, side by side, one thread each; "
        "chrF is the mean over directions (sacrebleu chrF2); BLEU: 'char' tokenizer for CJK/Thai targets, "
        "'13a' otherwise; "
        f"tokens/s: peak greedy decoding over batch sizes {BATCH_SIZES}, sentences into {language}, "
        f"{threads} thread(s)"
    )
    print("\n== examples ==")
    examples = [p for p in into_language[:3]] + [p for p in test if p.target_lang != language][:3]
    for pair in examples:
        [hypothesis] = translate_pairs(
            extracted.model if pair in into_language else moe.model, moe.tokenizer, moe.tasks, [pair]
        )
        print(f"{pair.source_lang}->{pair.target_lang}  {pair.source}\n      -> {hypothesis}\n   (ref) {pair.target}")
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} minutes")
    print(next_steps(moe, dense, extracted_dir, into_language[0] if into_language else test[0]))


def command_path(name: str) -> str:
    """How to call this environment's ``name`` script: .venv/bin/flexmoe-mt when the venv is below
    the working directory, else the absolute path (so the line runs without activating anything)."""
    script = Path(sys.executable).parent / name
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def next_steps(moe: TrainedModel, dense: TrainedModel, extracted_dir: Path, example: Pair) -> str:
    """The demo's last lines: where the models are, how to translate a sentence, what they know."""
    program = command_path("flexmoe-mt")
    languages = " ".join(moe.tasks.target_languages)
    return "\n".join(
        [
            f"models: task-MoE {moe.run.train.run_dir}, dense {dense.run.train.run_dir}, "
            f"{extracted_dir.name.removeprefix('extract-')} sub-network {extracted_dir}",
            "translate a sentence (--to: one of " + languages + "; a file argument or stdin, one sentence a line):",
            f'  echo "{example.source}" | {program} translate --model {moe.run.train.run_dir} '
            f"--to {example.target_lang} --from {example.source_lang}",
            "what the models know: the embedded corpus's phrases (numbers, years, dates, times, units, "
            "amounts of money, percentages, lists, names of languages, countries, currencies, scripts, "
            "months and days), not free text",
            f"a rerun reuses these trained models; {program} demo --fresh retrains them",
        ]
    )


if __name__ == "__main__":
    main()
