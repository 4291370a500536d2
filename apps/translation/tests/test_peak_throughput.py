"""The throughput sweep grows the batch until each model's tokens/s stops rising (or memory ends)."""

import pytest
import torch

from flexmoe_mt import evaluate
from flexmoe_mt.batching import EncodedPairs

SPEEDS = {  # tokens/s by batch: "a" rises until 64, "b" is flat from 4, "c" dips once at 4 (noise)
    "a": {1: 100, 2: 190, 4: 350, 8: 600, 16: 900, 32: 1200, 64: 1500, 128: 1490, 256: 1480},
    "b": {1: 100, 2: 180, 4: 200, 8: 201, 16: 199},
    "c": {1: 100, 2: 200, 4: 150, 8: 400, 16: 390, 32: 380},
}


def fake_time_batch(models, batch_size, max_new_tokens, repeats):
    return {name: SPEEDS[name][batch_size] for name in models}


def test_each_model_stops_where_its_tokens_per_s_stops_rising(monkeypatch):
    calls = []
    monkeypatch.setattr(
        evaluate, "_time_batch", lambda m, b, *a: calls.append((sorted(m), b)) or fake_time_batch(m, b, *a)
    )
    peaks = evaluate.peak_decoding_throughput({"a": None, "b": None})
    assert (peaks["a"].peak, peaks["a"].batch, peaks["a"].stopped) == (1500, 64, "flat")
    assert (peaks["b"].peak, peaks["b"].batch, peaks["b"].stopped) == (201, 8, "flat")  # +0.5%: not rising
    assert (["a", "b"], 16) in calls and (["a", "b"], 32) not in calls  # a stopped model is not timed again
    assert set(peaks["a"].to_dict()) == {"sweep", "peak_tokens_per_s", "peak_batch", "stopped"}


def test_one_noisy_point_does_not_end_a_sweep(monkeypatch):
    monkeypatch.setattr(evaluate, "_time_batch", fake_time_batch)
    peak = evaluate.peak_decoding_throughput({"c": None})["c"]
    assert (peak.peak, peak.batch, peak.stopped) == (400, 8, "flat")  # the dip at 4 did not stop it
    assert max(peak.sweep) == 32  # two sizes in a row without a rise end it
    peak = evaluate.peak_decoding_throughput({"c": None}, patience=1)["c"]
    assert (peak.peak, peak.batch) == (200, 2)
    with pytest.raises(ValueError, match="patience"):
        evaluate.peak_decoding_throughput({"c": None}, patience=0)


def test_the_sweep_ends_at_memory_or_the_limit(monkeypatch):
    def out_of_memory_at_32(models, batch_size, *args):
        if batch_size >= 32:
            raise torch.OutOfMemoryError("out of memory")
        return fake_time_batch(models, batch_size, *args)

    monkeypatch.setattr(evaluate, "_time_batch", out_of_memory_at_32)
    peak = evaluate.peak_decoding_throughput({"a": None})["a"]
    assert (peak.batch, peak.stopped) == (16, "memory")
    monkeypatch.setattr(evaluate, "_time_batch", fake_time_batch)
    peak = evaluate.peak_decoding_throughput({"a": None}, max_batch=8)["a"]
    assert (peak.batch, peak.stopped) == (8, "limit")
    with pytest.raises(ValueError, match="max_batch"):
        evaluate.peak_decoding_throughput({"a": None}, max_batch=0)


def test_a_batch_larger_than_the_sentences_cycles_through_them():
    data = EncodedPairs(["p0", "p1"], [[1], [2]], [[3], [4]], [0, 1], [0, 1])
    taken = evaluate._take(data, 5)
    assert taken.sources == [[1], [2], [1], [2], [1]] and taken.target_lang == [0, 1, 0, 1, 0]
