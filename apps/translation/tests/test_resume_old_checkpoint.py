"""A checkpoint written before the logging window was saved (no ``log_window`` entry) resumes:
the curve goes on, the first record after the resume averages only the steps since it."""

import json

import pytest
import torch
from translation_fixtures import one_thread, write_run_file

from flexmoe_mt.runconfig import load_run_config
from flexmoe_mt.train import train

_one_thread = pytest.fixture(autouse=True)(one_thread)


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


def test_checkpoint_without_log_window_resumes(tmp_path):
    steps = {"log_every": 2, "checkpoint_every": 3, "eval_every": 10}
    train(load_run_config(write_run_file(tmp_path, "straight", train=steps)), progress=False)
    expected = records(tmp_path / "straight")
    train(load_run_config(write_run_file(tmp_path, "old", train={**steps, "max_steps": 3})), progress=False)
    checkpoint = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert len(state.pop("log_window")["loss"]) == 1  # step 3, logged with step 4 in one record
    torch.save(state, checkpoint)
    train(load_run_config(write_run_file(tmp_path, "old", train=steps)), progress=False)
    resumed = records(tmp_path / "old")
    assert [step for step, _ in resumed] == [2, 4, 6]
    assert resumed[0] == expected[0] and resumed[2] == expected[2]  # before the checkpoint; after both steps
    assert resumed[1] != expected[1]  # step 4 averages step 4 alone: step 3's loss was not saved
