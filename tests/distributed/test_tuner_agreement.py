"""Two gloo processes on 127.0.0.1 record different timings; both must decide the same choice."""

import json
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from flexmoe.tuner import Choice, Tuner, TuningKey

A, B, C = Choice(0), Choice(1), Choice(2)
# Alone, rank 0 would pick A and rank 1 would pick B; the MAX across ranks is (5, 4, 3): C.
SECONDS = {0: {A: 1.0, B: 4.0, C: 3.0}, 1: {A: 5.0, B: 1.0, C: 3.0}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
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
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_slowest_rank_times(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1] == {"decided": C.to_json(), "rerun": C.to_json()}
