"""Translate a split and score it with sacrebleu: chrF (primary) and BLEU, per direction and mean.

BLEU needs a word tokenizer; one that works offline for every script is ``char`` for scripts
written without spaces (CJK, Thai, Lao, Khmer, Burmese) and ``13a`` for the others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sacrebleu
import torch
from tqdm import tqdm

from flexmoe_mt.batching import EncodedPairs, TaskTable, encode_pairs, pad
from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.tokenizer import Tokenizer
from flexmoe_mt.translation import TranslationModel

CHAR_BLEU_LANGUAGES = ("ja", "zh", "ko", "th", "lo", "km", "my", "yue")


def bleu_tokenizer(lang: str) -> str:
    """The sacrebleu tokenizer used for BLEU on text in ``lang``."""
    return "char" if lang.split("_")[0].split("-")[0] in CHAR_BLEU_LANGUAGES else "13a"


@dataclass
class Scores:
    """chrF and BLEU per direction (``"en-fr"``), their means over directions, and the BLEU
    tokenizer of each direction."""

    chrf: dict[str, float] = field(default_factory=dict)
    bleu: dict[str, float] = field(default_factory=dict)
    bleu_tokenizer: dict[str, str] = field(default_factory=dict)
    sentences: dict[str, int] = field(default_factory=dict)

    @property
    def mean_chrf(self) -> float:
        return sum(self.chrf.values()) / max(len(self.chrf), 1)

    @property
    def mean_bleu(self) -> float:
        return sum(self.bleu.values()) / max(len(self.bleu), 1)

    def to_dict(self) -> dict:
        return {
            "chrf": self.chrf,
            "bleu": self.bleu,
            "bleu_tokenizer": self.bleu_tokenizer,
            "sentences": self.sentences,
            "mean_chrf": self.mean_chrf,
            "mean_bleu": self.mean_bleu,
        }

    def table(self) -> str:
        lines = [f"{'direction':<10} {'chrF':>6} {'BLEU':>6}  BLEU tokenizer  sentences"]
        for direction in sorted(self.chrf):
            lines.append(
                f"{direction:<10} {self.chrf[direction]:6.1f} {self.bleu[direction]:6.1f}  "
                f"{self.bleu_tokenizer[direction]:<14}  {self.sentences[direction]}"
            )
        lines.append(f"{'mean':<10} {self.mean_chrf:6.1f} {self.mean_bleu:6.1f}")
        return "\n".join(lines)


def score(pairs: Sequence[Pair], hypotheses: Sequence[str]) -> Scores:
    """Corpus-level chrF and BLEU of ``hypotheses`` against ``pairs``' targets, per direction."""
    groups: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(f"{pair.source_lang}-{pair.target_lang}", []).append(index)
    scores = Scores()
    for direction, indices in sorted(groups.items()):
        hyps = [hypotheses[i] for i in indices]
        refs = [[pairs[i].target for i in indices]]
        tokenizer = bleu_tokenizer(pairs[indices[0]].target_lang)
        scores.chrf[direction] = sacrebleu.corpus_chrf(hyps, refs).score
        scores.bleu[direction] = sacrebleu.corpus_bleu(hyps, refs, tokenize=tokenizer).score
        scores.bleu_tokenizer[direction] = tokenizer
        scores.sentences[direction] = len(indices)
    return scores


def length_sorted_batches(data: EncodedPairs, batch_size: int) -> list[list[int]]:
    """Batches of indices of similar source length (less padding), covering every example once."""
    order = sorted(range(len(data.sources)), key=lambda i: (data.target_lang[i], len(data.sources[i])))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_ids(
    model: TranslationModel,
    data: EncodedPairs,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    beam_size: int = 1,
    progress: str | None = None,
) -> list[list[int]]:
    """Output ids of every example of ``data``, in order: greedy, or beam search when ``beam_size > 1``.
    ``progress``: a label for a progress bar over the batches (on stderr); None: no bar."""
    outputs: list[list[int]] = [[] for _ in data.sources]
    device = next(model.parameters()).device
    model.eval()
    batches = length_sorted_batches(data, batch_size)
    for indices in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False):
        inputs = (
            pad([data.sources[i] for i in indices]).to(device),
            torch.tensor([data.target_lang[i] for i in indices], device=device),
            torch.tensor([data.lang_pair[i] for i in indices], device=device),
        )
        if beam_size > 1:
            generated = model.beam_search(*inputs, beam_size=beam_size, max_new_tokens=max_new_tokens)
        else:
            generated = model.generate(*inputs, max_new_tokens)
        for row, index in zip(generated.tolist(), indices):
            outputs[index] = row
    return outputs


def translate_pairs(
    model: TranslationModel,
    tokenizer: Tokenizer,
    tasks: TaskTable,
    pairs: Sequence[Pair],
    batch_size: int = 64,
    max_new_tokens: int = 64,
    beam_size: int = 1,
    progress: str | None = None,
) -> list[str]:
    """Translations of ``pairs``' sources into their target languages (greedy, or beam search);
    ``progress``: a label for a progress bar (stderr), None for none."""
    data = encode_pairs(pairs, tokenizer, tasks, model.config.max_len)
    generated = generate_ids(model, data, batch_size, max_new_tokens, beam_size, progress)
    return [tokenizer.decode(ids) for ids in generated]


def _take(data: EncodedPairs, count: int) -> EncodedPairs:
    """The first ``count`` sentences of ``data``, cycling through it when it has fewer (a batch
    larger than the test set still decodes real sentences)."""
    rows = [i % len(data.sources) for i in range(count)]
    return EncodedPairs(*([getattr(data, f.name)[i] for i in rows] for f in dataclasses.fields(EncodedPairs)))


def _time_batch(
    models: Mapping[str, tuple[TranslationModel, EncodedPairs]], batch_size: int, max_new_tokens: int, repeats: int
) -> dict[str, float]:
    """Tokens/s of every model at one batch size: ``max(4 * batch_size, 16)`` sentences batched by
    length after a one-batch warm-up, the models timed in turn within each of ``repeats`` rounds
    (a change in the machine's load hits all alike), each model's fastest round counting."""
    seconds = dict.fromkeys(models, math.inf)
    tokens = {}
    for model, data in models.values():
        generate_ids(model, _take(data, batch_size), batch_size, max_new_tokens)  # warm-up
    for _ in range(repeats):
        for name, (model, data) in models.items():
            start = time.perf_counter()
            outputs = generate_ids(model, _take(data, max(4 * batch_size, 16)), batch_size, max_new_tokens)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
            tokens[name] = sum(len([t for t in row if t != model.config.pad_id]) for row in outputs)
    return {name: tokens[name] / seconds[name] for name in models}


def decoding_throughput(
    models: Mapping[str, tuple[TranslationModel, EncodedPairs]],
    batch_sizes: Sequence[int],
    max_new_tokens: int = 64,
    repeats: int = 3,
) -> dict[str, dict[int, float]]:
    """Greedy decoding throughput, generated tokens (up to eos) per second, per model and batch size.

    models: name -> (model, the sentences it decodes). Batch size ``b`` decodes
    ``max(4 * b, 16)`` sentences (cycling through the given ones), batched by length, after a
    one-batch warm-up. The models are timed in turn within each of ``repeats`` rounds, so a
    change in the machine's load hits all of them alike, and each model's fastest round counts
    (other load only ever adds time). For the peak Kudugunta et al. compare, see
    :func:`peak_decoding_throughput`.
    """
    results: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        for name, speed in _time_batch(models, batch_size, max_new_tokens, repeats).items():
            results[name][batch_size] = speed
    return results


@dataclass
class PeakThroughput:
    """A batch sweep of one model: ``sweep`` (batch size -> tokens/s), its ``peak`` tokens/s and
    the ``batch`` it was reached at; ``stopped``: why the sweep ended (``"flat"``: tokens/s
    stopped rising, ``"memory"``: the next batch did not fit, ``"limit"``: ``max_batch``)."""

    sweep: dict[int, float]
    peak: float
    batch: int
    stopped: str

    def to_dict(self) -> dict:
        return {"sweep": {str(b): s for b, s in self.sweep.items()}, "peak_tokens_per_s": self.peak,
                "peak_batch": self.batch, "stopped": self.stopped}  # fmt: skip


def peak_decoding_throughput(
    models: Mapping[str, tuple[TranslationModel, EncodedPairs]],
    max_batch: int = 4096,
    min_gain: float = 0.03,
    max_new_tokens: int = 64,
    repeats: int = 3,
    patience: int = 2,
) -> dict[str, PeakThroughput]:
    """Each model's peak decoding tokens/s: the batch doubles from 1 until the model's tokens/s
    has risen by less than ``min_gain`` (a fraction) over its best so far at ``patience`` batch
    sizes in a row (so one noisy point does not end a sweep), memory runs out, or ``max_batch``
    is passed. Models still rising are timed in turn at every batch size (see
    :func:`decoding_throughput`); a model that has stopped is not timed further."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be a fraction in [0, 1), got {min_gain!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1 (batch sizes in a row without a rise), got {patience!r}")
    sweeps: dict[str, dict[int, float]] = {name: {} for name in models}
    misses = dict.fromkeys(models, 0)
    stopped: dict[str, str] = {}
    batch_size = 1
    while len(stopped) < len(models):
        rising = {name: pair for name, pair in models.items() if name not in stopped}
        if batch_size > max_batch:
            stopped.update(dict.fromkeys(rising, "limit"))
            break
        try:
            speeds = _time_batch(rising, batch_size, max_new_tokens, repeats)
        except torch.OutOfMemoryError:
            stopped.update(dict.fromkeys(rising, "memory"))
            break
        for name, speed in speeds.items():
            best = max(sweeps[name].values(), default=0.0)
            sweeps[name][batch_size] = speed
            misses[name] = misses[name] + 1 if best and speed < best * (1 + min_gain) else 0
            if misses[name] >= patience:
                stopped[name] = "flat"
        batch_size *= 2
    peaks = {}
    for name, sweep in sweeps.items():
        batch = max(sweep, key=sweep.__getitem__)
        peaks[name] = PeakThroughput(sweep, sweep[batch], batch, stopped[name])
    return peaks
