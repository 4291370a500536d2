"""flexmoe with DeviceMesh, DTensor experts, DCP, FSDP2 and DDP on gloo ranks (two launches).

World 2: layers on a process group or a DeviceMesh hold DTensor experts and match the
single-process model, also for a DTensor input; DDP(model) leaves the experts out with no extra
step and matches the single-process model; plain fully_shard fails loudly.
World 4: FSDP2 on a 2 dp x 2 ep mesh matches the single-process loss and every gradient; DCP
checkpoints saved at 4, 2 and 1 rank(s) load at each, Adam state included.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.distributed.launcher import run_distributed
from tests.distributed.stack_checks import (
    check_clip_grad_norm,
    check_dcp_resharding,
    check_ddp,
    check_dtensor_experts,
    check_dtensor_input,
    check_fsdp_2d,
    check_optimizer_groups,
    check_plain_fully_shard,
)
from tests.distributed.trainer_checks import check_trainer

REPO = Path(__file__).resolve().parents[2]


def _world_2(rank: int, world_size: int) -> None:
    check_dtensor_experts(rank, world_size)
    check_dtensor_input(rank, world_size)
    check_optimizer_groups(rank, world_size)
    check_ddp(rank, world_size)
    check_plain_fully_shard(rank, world_size)


def _world_4(rank: int, world_size: int, directory: str) -> None:
    check_fsdp_2d(rank, world_size)
    check_dcp_resharding(rank, world_size, directory)
    check_clip_grad_norm(rank, world_size)


def test_world_2_dtensor_experts_and_ddp():
    run_distributed(_world_2, 2)


def test_world_4_fsdp2_and_dcp_resharding(tmp_path):
    run_distributed(_world_4, 4, str(tmp_path))


def _readme_recipe(rank: int, world_size: int, directory: str) -> None:
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Distributed\n.*?```py\n(.*?)```", text, flags=re.S).group(1)
    os.chdir(directory)  # the recipe writes ./ckpt
    exec(compile(code, "README.md Distributed recipe", "exec"), {"__name__": "recipe"})


def test_world_4_readme_recipe_runs_under_torchrun(tmp_path):
    """The README's FSDP2 + expert-parallel + DCP recipe, as torchrun would run it."""
    run_distributed(_readme_recipe, 4, str(tmp_path))
    assert (tmp_path / "ckpt" / ".metadata").is_file()


def test_world_2_transformers_trainer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    run_distributed(check_trainer, 2, str(tmp_path))
