"""Checkpoints across world sizes, with ranks simulated in one process.

A rank model is a copy of the single-process model whose expert parameters are replaced by the
rank's shards (``ExpertLayout.shard``) and whose MoE layers carry that ``layout``; its Adam
state is sharded the same way. Every test compares, after unsharding, with the global tensors.
"""

import copy
import json

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, load_checkpoint, save_checkpoint
from flexmoe.checkpoint import METADATA_FILE, CheckpointReader, convert_checkpoint, rank_file_name
from flexmoe.cli import main as cli_main
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS, ExpertLayout, unshard

LR = 1e-2


class Net(nn.Module):
    """Two MoE layers (4 whole experts; 2 gated experts, sharded when world > 2) and a Linear."""

    def __init__(self, hidden_dim: int = 8):
        super().__init__()
        self.moe1 = MoELayer(model_dim=8, num_experts=4, hidden_dim=hidden_dim, group=SINGLE_PROCESS)
        self.proj = nn.Linear(8, 8)
        self.moe2 = MoELayer(model_dim=8, num_experts=2, hidden_dim=hidden_dim, gated=True, group=SINGLE_PROCESS)

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(self.proj(x))


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_axes(model) -> dict[str, tuple[int, int | None]]:
    """Parameter name -> (num_experts, hidden axis) for the expert parameters of a global model."""
    axes = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, MoELayer):
            for name, _ in layer.experts.named_parameters():
                axes[f"{layer_name}.experts.{name}".lstrip(".")] = (layer.config.num_experts, HIDDEN_AXIS[name])
    return axes


def trained(seed: int = 0):
    """The single-process model after two Adam steps (so exp_avg, exp_avg_sq and step are real)."""
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 6, 8)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def rank_model(model, optimizer, world_size: int, rank: int):
    """Rank ``rank`` of ``world_size``: expert parameters and their Adam state become local shards."""
    local = copy.deepcopy(model)
    for layer in moe_layers(local):
        layer.layout = ExpertLayout(layer.config.num_experts, world_size, rank)
        for name, axis in HIDDEN_AXIS.items():
            param = getattr(layer.experts, name, None)
            if param is not None:
                setattr(layer.experts, name, nn.Parameter(layer.layout.shard(param.detach(), axis).clone()))
    local_optimizer = torch.optim.Adam(local.parameters(), lr=1.0)  # the checkpoint restores lr
    if optimizer is not None:
        state = copy.deepcopy(optimizer.state_dict())
        names, params = zip(*model.named_parameters())
        axes = expert_axes(model)
        for index, entries in state["state"].items():
            if names[index] in axes:
                num_experts, axis = axes[names[index]]
                for key, value in entries.items():
                    if value.shape == params[index].shape:
                        entries[key] = ExpertLayout(num_experts, world_size, rank).shard(value, axis).clone()
        local_optimizer.load_state_dict(state)
    return local, local_optimizer


def ranks(model, optimizer, world_size: int):
    return [rank_model(model, optimizer, world_size, rank) for rank in range(world_size)]


def global_tensors(rank_pairs) -> dict[str, torch.Tensor]:
    """Unshard every parameter and Adam state tensor of the rank models; replicated ones must agree."""
    global_model = rank_pairs[0][0]
    axes = expert_axes(global_model)
    tensors = {}
    for name, _ in global_model.named_parameters():
        per_rank = [dict(m.named_parameters())[name] for m, _ in rank_pairs]
        states = [opt.state[p] for p, (_, opt) in zip(per_rank, rank_pairs)]
        candidates = {name: [p.detach() for p in per_rank]}
        candidates.update({f"{name}/{key}": [s[key] for s in states] for key in states[0]})
        for key, values in candidates.items():
            if name in axes and values[0].dim() > 0:
                tensors[key] = unshard(values, axes[name][1], axes[name][0])
            else:
                for value in values[1:]:
                    torch.testing.assert_close(value, values[0], rtol=0, atol=0)
                tensors[key] = values[0]
    return tensors


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def save_ranks(directory, rank_pairs, **kwargs):
    for rank, (model, optimizer) in enumerate(rank_pairs):
        save_checkpoint(directory, model, optimizer, rank=rank, world_size=len(rank_pairs), **kwargs)


def load_ranks(directory, world_size: int, seed: int = 99):
    """Fresh rank models (another init, no optimizer state) loaded from ``directory``."""
    torch.manual_seed(seed)
    targets = ranks(Net(), None, world_size)
    for rank, (model, optimizer) in enumerate(targets):
        load_checkpoint(directory, model, optimizer, rank=rank, world_size=world_size)
    return targets


@pytest.fixture(scope="module")
def original():
    model, optimizer = trained()
    return model, optimizer, global_tensors([(model, optimizer)])


@pytest.mark.parametrize("to_world", [1, 2, 4])
@pytest.mark.parametrize("from_world", [1, 2, 4])
def test_save_at_one_world_size_load_at_another(tmp_path, original, from_world, to_world):
    model, optimizer, expected = original
    assert any(v.dim() > 0 for k, v in expected.items() if k.endswith("exp_avg_sq"))
    save_ranks(tmp_path, ranks(model, optimizer, from_world))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [METADATA_FILE] + [rank_file_name(r, from_world) for r in range(from_world)]
    )
    loaded = load_ranks(tmp_path, to_world)
    assert_same_tensors(global_tensors(loaded), expected)
    for _, local_optimizer in loaded:
        assert local_optimizer.param_groups[0]["lr"] == LR and isinstance(
            local_optimizer.param_groups[0]["betas"], tuple
        )
    # 2 experts on 4 ranks: each expert cut in 2 along the hidden axis.
    if to_world == 4:
        assert loaded[3][0].moe2.experts.w1.shape == (1, 8, 4)


def test_replicated_tensors_are_written_by_rank_zero_only(tmp_path, original):
    model, optimizer, _ = original
    save_ranks(tmp_path, ranks(model, optimizer, 2))
    from safetensors import safe_open

    keys = []
    for rank in range(2):
        with safe_open(str(tmp_path / rank_file_name(rank, 2)), framework="pt") as file:
            keys.append(set(file.keys()))
    assert "model/proj.weight" in keys[0] and "model/proj.weight" not in keys[1]
    assert "optim/moe1.experts.w1/exp_avg" in keys[1] and "optim/moe1.experts.w1/step" not in keys[1]


def test_outputs_and_training_equal_after_round_trip(tmp_path, original):
    model, optimizer, _ = original
    model, optimizer = copy.deepcopy((model, optimizer))  # one copy: the optimizer keeps its params
    x = torch.randn(3, 5, 8)
    save_checkpoint(tmp_path, model, optimizer, extra={"step": 2})
    torch.manual_seed(7)
    restored = Net()
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=1.0)
    assert load_checkpoint(tmp_path, restored, restored_optimizer) == {"step": 2}
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    for net, opt in ((model, optimizer), (restored, restored_optimizer)):  # one more identical step
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


def test_cli_convert_round_trip(tmp_path, original, capsys):
    model, optimizer, expected = original
    src, two, one = tmp_path / "w4", tmp_path / "w2", tmp_path / "w1"
    save_ranks(src, ranks(model, optimizer, 4))
    assert cli_main(["checkpoint", "convert", str(src), str(two), "--to-world-size", "2"]) == 0
    assert "world size 4" in capsys.readouterr().out
    assert_same_tensors(global_tensors(load_ranks(two, 2)), expected)
    convert_checkpoint(two, one, to_world_size=1)
    restored = Net(), None
    load_checkpoint(one, restored[0])
    x = torch.randn(2, 8)
    torch.testing.assert_close(restored[0](x), model(x), rtol=0, atol=0)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path, model)
    restored = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_checkpoint(tmp_path, restored)
    torch.testing.assert_close(restored[1].weight, model[0].weight, rtol=0, atol=0)


# --- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, original):
    model, optimizer, _ = original
    save_ranks(tmp_path, ranks(model, optimizer, 2))
    return tmp_path


def test_layout_of_another_world_size(tmp_path, original):
    model, optimizer, _ = original
    local, local_optimizer = rank_model(model, optimizer, 2, 1)
    with pytest.raises(ValueError, match="layout of rank 1 of world size 2"):
        save_checkpoint(tmp_path, local, local_optimizer, rank=1, world_size=4)
    with pytest.raises(ValueError, match="layout"):
        save_checkpoint(tmp_path, model, rank=0, world_size=2)  # no layout = world 1


@pytest.mark.parametrize("text", ["{broken", '{"format": "other"}', '{"format": "flexmoe-checkpoint", "version": 1}'])
def test_corrupted_metadata(saved, text):
    (saved / METADATA_FILE).write_text(text)
    with pytest.raises(ValueError, match=r"corrupted|not a flexmoe"):
        load_ranks(saved, 1)


def test_other_format_version(saved):
    description = json.loads((saved / METADATA_FILE).read_text())
    (saved / METADATA_FILE).write_text(json.dumps({**description, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_ranks(saved, 2)


def test_missing_files(saved, tmp_path_factory):
    (saved / rank_file_name(1, 2)).unlink()
    with pytest.raises(FileNotFoundError, match="rank files"):
        load_ranks(saved, 2)
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.json"):
        load_ranks(tmp_path_factory.mktemp("empty"), 1)


def test_architecture_mismatch(saved):
    extended = Net()
    extended.head = nn.Linear(8, 2)
    with pytest.raises(ValueError, match=r"missing keys \['head.bias', 'head.weight'\]"):
        load_checkpoint(saved, extended)
    del extended.head, extended.proj
    with pytest.raises(ValueError, match=r"unexpected keys \['proj.bias', 'proj.weight'\]"):
        load_checkpoint(saved, extended)
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(saved, Net(hidden_dim=16))


def test_expert_count_mismatch(saved):
    model = Net()
    model.moe1 = MoELayer(model_dim=8, num_experts=2, hidden_dim=16)
    with pytest.raises(ValueError, match=r"moe1\.experts"):
        load_checkpoint(saved, model)


def test_optimizer_errors(tmp_path, original):
    model, _, _ = original
    save_checkpoint(tmp_path, model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path, Net(), torch.optim.Adam(Net().parameters()))
    stranger = Net()
    with pytest.raises(ValueError, match="not in model"):
        save_checkpoint(tmp_path, model, torch.optim.Adam(stranger.parameters()))


def test_convert_errors(saved, tmp_path_factory, capsys):
    with pytest.raises(ValueError, match="to_world_size=3"):
        convert_checkpoint(saved, tmp_path_factory.mktemp("out"), 3)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(saved, saved, 1)
    with pytest.raises(SystemExit, match="to_world_size=3"):
        cli_main(["checkpoint", "convert", str(saved), str(tmp_path_factory.mktemp("cli")), "--to-world-size", "3"])


@pytest.mark.parametrize("rank,world_size,error", [(2, 2, ValueError), (0, 0, ValueError), (0.0, 1, TypeError)])
def test_bad_rank_or_world(tmp_path, rank, world_size, error):
    with pytest.raises(error, match=r"rank|world_size"):
        save_checkpoint(tmp_path, Net(), rank=rank, world_size=world_size)


def test_optimizer_state_follows_names_not_positions(tmp_path, original):
    model, optimizer, expected = original
    save_checkpoint(tmp_path, model, optimizer)
    restored = Net()
    reversed_optimizer = torch.optim.Adam(list(restored.parameters())[::-1], lr=1.0)
    load_checkpoint(tmp_path, restored, reversed_optimizer)
    assert_same_tensors(global_tensors([(restored, reversed_optimizer)]), expected)


def test_param_groups_must_match(tmp_path, original):
    model, optimizer, _ = original
    save_checkpoint(tmp_path, model, optimizer)
    restored = Net()
    params = list(restored.parameters())
    split = torch.optim.Adam([{"params": params[:3]}, {"params": params[3:]}])
    with pytest.raises(ValueError, match="param groups"):
        load_checkpoint(tmp_path, restored, split)


def test_rank_file_from_another_checkpoint(saved, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    save_checkpoint(other, Net())
    (saved / rank_file_name(1, 2)).write_bytes((other / rank_file_name(0, 1)).read_bytes())
    with pytest.raises(ValueError, match="not written by rank 1 of 2"):
        load_ranks(saved, 2)


@pytest.mark.parametrize("from_world,to_world", [(3, 4), (4, 6), (6, 4), (2, 12), (12, 3), (24, 6), (3, 24)])
def test_uneven_regrouping_reads_only_covering_ranks(tmp_path, monkeypatch, from_world, to_world):
    # 12 experts: groups that do not nest (3 -> 4 ranks: rank 1 wants experts 3..5, held by saved ranks 0, 1).
    torch.manual_seed(3)
    layer = MoELayer(model_dim=4, num_experts=12, hidden_dim=8)
    expected = global_tensors([(layer, torch.optim.Adam(layer.parameters()))])
    save_ranks(tmp_path, ranks(layer, None, from_world))
    reads = []
    original_read = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read", lambda self, key, r: reads.append(r) or original_read(self, key, r))
    targets = ranks(MoELayer(model_dim=4, num_experts=12, hidden_dim=8), None, to_world)
    for rank, (model, _) in enumerate(targets):
        reads.clear()
        load_checkpoint(tmp_path, model, rank=rank, world_size=to_world)
        wanted = ExpertLayout(12, to_world, rank).expert_slice
        holders = {r for r in range(from_world) if ExpertLayout(12, from_world, r).expert_slice.start < wanted.stop}
        holders = {r for r in holders if wanted.start < ExpertLayout(12, from_world, r).expert_slice.stop}
        assert set(reads) - {0} <= holders  # replicated tensors come from rank 0
    assert_same_tensors(global_tensors(targets), {k: v for k, v in expected.items() if "/" not in k})


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, Net(), extra={"when": object()})
    assert not any(tmp_path.iterdir())  # nothing written
