"""Two gloo processes on 127.0.0.1 record different timings; both must decide the same choice."""

import json

from flexmoe.tuner import Choice, Tuner, TuningKey
from tests.distributed.launcher import run_distributed

A, B, C = Choice(0), Choice(1), Choice(2)
# Alone, rank 0 would pick A and rank 1 would pick B; the MAX across ranks is (5, 4, 3): C.
SECONDS = {0: {A: 1.0, B: 4.0, C: 3.0}, 1: {A: 5.0, B: 1.0, C: 3.0}}


def worker(rank: int, world_size: int, out_dir: str) -> None:
    key = TuningKey(2, 64, 8, 16, 1, 2, "float32", "cpu")
    tuner = Tuner(trials_per_candidate=2, cache_path=f"{out_dir}/cache.json")
    while tuner.is_tuning(key):
        choice = tuner.choose(key, [A, B, C])
        tuner.record(key, choice, SECONDS[rank][choice])
    # A second tuner over the same cache starts tuned on both ranks (rank 0's cache broadcast).
    rerun = Tuner(cache_path=f"{out_dir}/cache.json")
    result = {"decided": tuner.decision(key).to_json(), "rerun": rerun.choose(key, [A, B, C]).to_json()}
    with open(f"{out_dir}/rank{rank}.json", "w") as file:
        json.dump(result, file)


def test_ranks_agree_on_slowest_rank_times(tmp_path):
    run_distributed(worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1] == {"decided": C.to_json(), "rerun": C.to_json()}
