import pytest
import torch

from flexmoe.parallel import HIDDEN_AXIS, ExpertLayout, unshard


@pytest.mark.parametrize("num_experts,world_size", [(8, 1), (8, 2), (8, 4), (4, 4), (2, 4), (1, 4), (2, 8)])
def test_shard_unshard_round_trip(num_experts, world_size):
    hidden = 8
    shapes = {
        "w1": (num_experts, 3, hidden),
        "b1": (num_experts, hidden),
        "w2": (num_experts, hidden, 3),
        "b2": (num_experts, 3),
    }
    for name, shape in shapes.items():
        full = torch.randn(shape)
        layouts = [ExpertLayout(num_experts, world_size, r) for r in range(world_size)]
        shards = [layout.shard(full, HIDDEN_AXIS[name]) for layout in layouts]
        for layout, shard in zip(layouts, shards):
            assert shard.shape[0] == layout.local_experts
            if HIDDEN_AXIS[name] is not None:
                assert shard.shape[HIDDEN_AXIS[name]] == hidden // layout.shards_per_expert
        torch.testing.assert_close(unshard(shards, HIDDEN_AXIS[name], num_experts), full, rtol=0, atol=0)


def test_every_rank_stores_one_over_world_of_cut_parameters():
    for num_experts, world_size in [(8, 4), (2, 4), (1, 8)]:
        full = torch.randn(num_experts, 4, 16)
        sizes = [ExpertLayout(num_experts, world_size, r).shard(full, 2).numel() for r in range(world_size)]
        assert sizes == [full.numel() // world_size] * world_size


def test_degrees_and_positions():
    layout = ExpertLayout(2, 8, rank=5)
    assert (layout.shards_per_expert, layout.local_experts, layout.first_expert, layout.shard_index) == (4, 1, 1, 1)
    assert layout.valid_degrees() == [0, 1, 2, 4]
    assert ExpertLayout(8, 4, rank=3).expert_slice == slice(6, 8)
    assert ExpertLayout(8, 4).valid_degrees() == [0, 1]


@pytest.mark.parametrize("args,match", [((6, 4), "divide"), ((4, 0), "world_size"), ((4, 2, 2), "rank")])
def test_bad_layouts(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertLayout(*args)


def test_hidden_must_divide():
    with pytest.raises(ValueError, match="hidden_dim"):
        ExpertLayout(2, 8).local_hidden_dim(6)
