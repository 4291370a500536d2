"""Scores and throughput of trained models side by side: full vs extracted vs dense."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from flexmoe.task.extract import count_parameters
from flexmoe_mt.batching import encode_pairs
from flexmoe_mt.data.corpus import Pair, read_tsv
from flexmoe_mt.evaluate import (
    PeakThroughput,
    Scores,
    decoding_throughput,
    peak_decoding_throughput,
    score,
    translate_pairs,
)
from flexmoe_mt.extraction import load_translation_model
from flexmoe_mt.train import TrainedModel, load_corpus


def served_pairs(trained: TrainedModel, pairs: list[Pair]) -> list[Pair]:
    """The pairs a model can translate: all for a full model, one direction's for an extracted one."""
    if trained.task is None:
        return [p for p in pairs if p.target_lang in trained.tasks.target_languages]
    source_lang, _, target_lang = trained.task.rpartition("-")
    return [p for p in pairs if p.target_lang == target_lang and (not source_lang or p.source_lang == source_lang)]


def evaluation_pairs(trained: TrainedModel, split: str, tsv: str | None = None, limit: int = 0) -> list[Pair]:
    """``split`` of the run's corpus (or the TSV file), restricted to what the model serves."""
    pairs = read_tsv(tsv) if tsv else load_corpus(trained.run.data)[split]
    pairs = served_pairs(trained, pairs)
    return pairs[:limit] if limit else pairs


def evaluate_model(
    trained: TrainedModel,
    split: str = "test",
    tsv: str | None = None,
    limit: int = 0,
    batch_size: int = 64,
    beam_size: int = 1,
    progress: bool = False,
) -> Scores:
    """Scores of ``trained`` on ``split`` (or the TSV file); ``progress``: a progress bar on stderr."""
    pairs = evaluation_pairs(trained, split, tsv, limit)
    label = f"translating {len(pairs)} sentences" if progress else None
    hypotheses = translate_pairs(
        trained.model, trained.tokenizer, trained.tasks, pairs, batch_size, beam_size=beam_size, progress=label
    )
    return score(pairs, hypotheses)


def compare_extracted(
    full: TrainedModel, extracted_dir: str | Path, split: str, limit: int, progress: bool = False
) -> str:
    """Load the saved sub-network back and score it and its parent on the same sentences
    (the direction is the one the sub-network serves); ``progress``: progress bars on stderr."""
    extracted = load_translation_model(extracted_dir)
    pairs = evaluation_pairs(extracted, split, limit=limit)
    outputs = {}
    for name, trained in (("full", full), ("extracted", extracted)):
        label = f"{name} model, {len(pairs)} sentences" if progress else None
        hypotheses = translate_pairs(trained.model, trained.tokenizer, trained.tasks, pairs, progress=label)
        outputs[name] = (hypotheses, score(pairs, hypotheses), count_parameters(trained.model))
    same = sum(a == b for a, b in zip(outputs["full"][0], outputs["extracted"][0]))
    lines = [f"{'model':<10} {'parameters':>11} {'chrF':>6} {'BLEU':>6}   ({len(pairs)} {split} sentences)"]
    for name, (_, scores, parameters) in outputs.items():
        lines.append(f"{name:<10} {parameters:>11,} {scores.mean_chrf:6.1f} {scores.mean_bleu:6.1f}")
    lines.append(f"identical translations: {same}/{len(pairs)}")
    return "\n".join(lines)


def _decoding_inputs(models: Mapping[str, TrainedModel], pairs: list[Pair]) -> dict:
    """name -> (model, the encoded pairs it serves)."""
    inputs = {}
    for name, trained in models.items():
        served = served_pairs(trained, pairs)
        inputs[name] = (
            trained.model,
            encode_pairs(served, trained.tokenizer, trained.tasks, trained.model.config.max_len),
        )
    return inputs


def throughputs(
    models: Mapping[str, TrainedModel], pairs: list[Pair], batch_sizes: Sequence[int]
) -> dict[str, dict[int, float]]:
    """Decoding tokens/s per model and batch size on ``pairs`` (what each model serves of them),
    the models timed in turn (see :func:`decoding_throughput`)."""
    return decoding_throughput(_decoding_inputs(models, pairs), batch_sizes)


def peak_throughputs(
    models: Mapping[str, TrainedModel], pairs: list[Pair], max_batch: int = 4096
) -> dict[str, PeakThroughput]:
    """Each model's peak decoding tokens/s on ``pairs`` and the batch it is reached at: the batch
    doubles until the model's tokens/s stops rising (see :func:`peak_decoding_throughput`)."""
    return peak_decoding_throughput(_decoding_inputs(models, pairs), max_batch=max_batch)


def throughput_table(model_dirs: list[str], batch_sizes: list[int], task: str | None = None) -> str:
    """Tokens/s of each model over the sweep, the peak, and the peak's ratio to the first model's."""
    models = {directory: load_translation_model(directory) for directory in model_dirs}
    pairs = load_corpus(next(iter(models.values())).run.data)["test"]
    if task is not None:
        pairs = [p for p in pairs if p.target_lang == task]
    sweeps = throughputs(models, pairs, batch_sizes)
    first_peak = max(sweeps[model_dirs[0]].values())
    header = f"{'model':<40} {'parameters':>11} " + " ".join(f"{'bs=' + str(b):>8}" for b in batch_sizes)
    lines = [header + f" {'peak':>8} {'ratio':>6}"]
    for directory, sweep in sweeps.items():
        cells = " ".join(f"{sweep[b]:>8.0f}" for b in batch_sizes)
        peak = max(sweep.values())
        parameters = count_parameters(models[directory].model)
        lines.append(f"{directory:<40} {parameters:>11,} {cells} {peak:>8.0f} {peak / first_peak:6.2f}")
    return "tokens/s (greedy decoding)\n" + "\n".join(lines)
