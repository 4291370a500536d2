"""Two gloo processes save their shards with rank and world size taken from torch.distributed,
load them back the same way, and the single process loads the result at world size 1."""

import torch

from flexmoe import load_checkpoint, save_checkpoint
from tests.distributed.launcher import run_distributed
from tests.test_checkpoint import Net, assert_same_tensors, global_tensors, rank_model, trained


def worker(rank: int, world_size: int, directory: str) -> None:
    model, optimizer = trained()
    if rank == 0:
        torch.save(global_tensors([(model, optimizer)]), f"{directory}/expected.pt")
    local, local_optimizer = rank_model(model, optimizer, world_size, rank)
    save_checkpoint(f"{directory}/ckpt", local, local_optimizer, extra={"saved_by": world_size})
    fresh, fresh_optimizer = rank_model(Net(), None, world_size, rank)
    assert load_checkpoint(f"{directory}/ckpt", fresh, fresh_optimizer) == {"saved_by": world_size}
    for (name, param), loaded in zip(local.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(loaded, param, rtol=0, atol=0, msg=name)


def test_distributed_save_then_single_process_load(tmp_path):
    run_distributed(worker, 2, str(tmp_path))
    model = Net()
    optimizer = torch.optim.Adam(model.parameters())
    load_checkpoint(tmp_path / "ckpt", model, optimizer)
    assert_same_tensors(global_tensors([(model, optimizer)]), torch.load(tmp_path / "expected.pt"))
