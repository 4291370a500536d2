"""flexmoe-mt demo (make demo): build the corpus, train a task-MoE and a dense model for the same
number of steps (so the result is the same on every machine; only the time changes), evaluate
both, extract one language's sub-network, and print scores, decoding throughput at each model's
peak batch and example translations.

    flexmoe-mt demo [--steps N] [--language fr] [--tsv-dir DIR] [--fresh]
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from flexmoe.cli import CommandParser, int_at_least
from flexmoe.task.extract import count_parameters
from flexmoe_mt.compare import peak_throughputs, served_pairs
from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.evaluate import score, translate_pairs
from flexmoe_mt.extraction import extract_direction, load_translation_model, save_extracted
from flexmoe_mt.plots import read_metrics
from flexmoe_mt.results import corpus_digest, package_versions
from flexmoe_mt.runconfig import RunConfig, load_run_config
from flexmoe_mt.runfiles import clear_run, files_to_clear
from flexmoe_mt.train import TrainedModel, load_corpus, load_trained, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAX_BATCH = 2048  # the throughput sweep doubles the batch up to here, or until tokens/s stops rising


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


def demo_config(name: str, steps: int | None, tsv_dir: str | None, seed: int | None = None) -> RunConfig:
    """configs/<name>.toml, trained ``steps`` steps (default: its max_steps; its max_minutes is
    only a safety cap), on the TSV files of ``tsv_dir`` if given; another ``seed`` trains into
    its own run directory (``<run_dir>-seed<N>``), so runs of several seeds give the spread."""
    run = load_run_config(CONFIGS / f"{name}.toml")
    train_config = dataclasses.replace(run.train, max_steps=steps or run.train.max_steps)
    if seed is not None:
        train_config = dataclasses.replace(train_config, seed=seed, run_dir=f"{train_config.run_dir}-seed{seed}")
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
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps per model (default: the demo configs' max_steps)"
    )
    parser.add_argument(
        "--seed", type=int, help="train with this seed (its own run directories; default: the configs')"
    )
    parser.add_argument("--language", default="fr", help="target language to extract (default fr)")
    parser.add_argument(
        "--per-direction", type=int_at_least(1), default=25, help="test sentences per direction (default 25)"
    )
    parser.add_argument("--tsv-dir", help="use DIR/{train,valid,test}.tsv instead of the embedded corpus")
    parser.add_argument("--fresh", action="store_true", help="retrain even if runs/demo holds finished runs")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be >= 1 (0: the configs' max_steps), got {args.steps}")
    started = time.perf_counter()
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    runs = {name: demo_config(name, args.steps, args.tsv_dir, args.seed) for name in ("demo_task_moe", "demo_dense")}
    steps_each = runs["demo_task_moe"].train.max_steps
    if args.fresh:
        try:  # the runs' own files only (flexmoe_mt.runfiles), never a directory that is not a run's
            stale = {Path(run.train.run_dir): files_to_clear(Path(run.train.run_dir)) for run in runs.values()}
        except ValueError as error:
            parser.error(str(error))
        for run_dir, paths in stale.items():
            clear_run(run_dir, paths)
    threads = runs["demo_task_moe"].train.threads or torch.get_num_threads()
    versions = ", ".join(f"{name} {version}" for name, version in package_versions().items() if name != "torch")
    print(f"flexmoe demo: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; {versions}")

    print("\n== corpus ==")
    try:
        corpus = load_corpus(runs["demo_task_moe"].data)
    except (FileNotFoundError, ValueError) as error:  # a missing or empty --tsv-dir file
        parser.error(str(error))
    print(
        f"{len(corpus['train']):,} training pairs, {len(corpus.target_languages)} target languages "
        f"(corpus SHA-256 {corpus_digest(corpus)[:16]})"
    )
    if args.language not in corpus.target_languages:
        known = ", ".join(corpus.target_languages)
        parser.error(f"--language {args.language}: the corpus's target languages are {known}; pass one of them")
    print(f"\n== training task-MoE and dense side by side, {steps_each} steps each, one thread each ==")
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
    sweeps = peak_throughputs(speed_models, into_language, MAX_BATCH)
    peaks = {name: sweep.peak for name, sweep in sweeps.items()}
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
        rising = ", still rising at the sweep's limit" if peak and sweeps[name].stopped == "limit" else ""
        speed = f"{peak:9.0f} (batch {sweeps[name].batch}{rising})" if peak else f"{'':>9}"
        trained_steps = steps.get(name.split(",")[0], "")
        print(f"{name:<22} {trained_steps:>6} {parameters:>10,} {chrf:6.1f} {bleu:6.1f} {speed}")
    same = sum(a == b for a, b in zip(outputs[f"task-MoE, into {language}"], outputs[f"extracted {language}"]))
    print(
        f"\nextracted vs full task-MoE into {language}: identical translations {same}/{len(into_language)}, "
        f"decoding throughput x{peaks[f'extracted {language}'] / peaks[f'task-MoE, into {language}']:.2f} "
        f"(vs dense x{peaks[f'extracted {language}'] / peaks[f'dense, into {language}']:.2f})"
    )
    print(
        f"both models trained {steps_each} steps, side by side, one thread each "
        f"({(time.perf_counter() - started) / 60:.0f} minutes so far on this machine); "
        "chrF is the mean over directions (sacrebleu chrF2); BLEU: 'char' tokenizer for CJK/Thai targets, "
        "'13a' otherwise; "
        "tokens/s: peak greedy decoding, the batch doubled until tokens/s stopped rising (its batch in "
        f"brackets), sentences into {language}, "
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
