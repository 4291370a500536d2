"""The translation trainer under torch.distributed (2 gloo ranks, experts sharded over them)
continues a single-process run exactly as the single process does: same parameters, optimizer
state and losses after the same steps, and a checkpoint in the single-process format."""

import json
import os
import shutil
import subprocess
import sys

import torch
from translation_fixtures import write_run_file

from flexmoe_mt.cli import main as cli
from flexmoe_mt.runconfig import load_run_config
from flexmoe_mt.train import Trainer, read_checkpoint, train
from tests.distributed.launcher import free_port, run_distributed

# Dropless (per-rank capacities would differ from the single process's), no dropout (other
# random masks), no balance loss (each rank's own, then averaged: not the whole batch's).
MODEL = {"num_experts": 4, "capacity_factor": 0.0, "dropout": 0.0, "aux_loss_weight": 0.0}


def train_on_ranks(rank: int, world_size: int, run_file: str) -> None:
    Trainer(load_run_config(run_file), progress=False).run()


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_world_2_continues_a_single_process_run_as_the_single_process_does(tmp_path):
    torch.set_num_threads(1)
    train(load_run_config(write_run_file(tmp_path, "single", MODEL, {"max_steps": 2})), progress=False)
    shutil.copytree(tmp_path / "single", tmp_path / "sharded")
    steps = {"max_steps": 5, "eval_every": 3, "checkpoint_every": 4}
    train(load_run_config(write_run_file(tmp_path, "single", MODEL, steps)), progress=False)
    run_distributed(train_on_ranks, 2, str(write_run_file(tmp_path, "sharded", MODEL, steps)))

    expected, got = read_checkpoint(tmp_path / "single"), read_checkpoint(tmp_path / "sharded")
    assert got["step"] == expected["step"] == 5
    assert got["model"].keys() == expected["model"].keys()  # every expert, single-process names
    for key, tensor in expected["model"].items():
        # A key bias shifts every score of a query alike: its true gradient is 0, and Adam turns
        # the rounding noise left in its place into steps of up to lr (both runs, other noise).
        loose = key.endswith("key.bias")
        torch.testing.assert_close(got["model"][key], tensor, rtol=1e-4, atol=1e-3 if loose else 1e-5, msg=key)
    for index, state in expected["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)
    assert len(got["torch_rng_by_rank"]) == 2
    single, sharded = losses(tmp_path / "single"), losses(tmp_path / "sharded")
    assert sorted(sharded) == sorted(single) == [1, 2, 3, 4, 5]
    for step in single:
        assert abs(sharded[step] - single[step]) < 1e-4, (step, sharded[step], single[step])
    # Step 2: the single-process run copied; then rank 0 validated the gathered model at step 3
    # and at the end, and plotted it.
    valid = [json.loads(line) for line in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in valid if r["split"] == "valid"] == [2, 3, 5]
    assert (tmp_path / "sharded" / "loss.png").is_file()


def test_torchrun_command_trains_then_a_single_process_evaluates(tmp_path):
    """``torchrun -m flexmoe_mt train`` end to end (the command joins torchrun's world itself), then
    ``flexmoe-mt eval`` reads the checkpoint in one process."""
    run_file = write_run_file(tmp_path, "run", {"num_experts": 4}, {"max_steps": 3})
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    done = subprocess.run(
        [*command, "-m", "flexmoe_mt", "train", "--config", str(run_file), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports
    assert read_checkpoint(tmp_path / "run")["step"] == 3
    assert cli(["eval", "--model", str(tmp_path / "run"), "--limit", "4"]) == 0
    assert (tmp_path / "run" / "eval-test.json").is_file()
